"""`soundctm-rt serve`: the OSC daemon."""

from __future__ import annotations

import typer


def serve() -> None:
    """Serve OSC prompts (the daemon lands with its own issue)."""
    raise typer.Exit(2)
