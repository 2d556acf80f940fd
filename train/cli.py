"""`soundctm-rt train ...` (also `python -m soundctm_rt.train ...`, torchrun-capable)."""

from __future__ import annotations

import typer

app = typer.Typer(help="Prepare data and train the VAE, the EDM teacher and the CTM student.", no_args_is_help=True)
