"""`soundctm-rt export`: a trained checkpoint, or a freshly initialised architecture, to a bundle."""

from __future__ import annotations

from pathlib import Path

import typer


def export(
    checkpoint: Path | None = typer.Argument(None, help="Model checkpoint (.safetensors) from `train distill`."),
    output: Path = typer.Option(..., "--output", "-o", help="Bundle directory to write."),
    steps: str = typer.Option("1,2,4,8", help="Step counts to export as fused graphs, comma-separated."),
    int8: bool = typer.Option(False, "--int8", help="Also write INT8 variants (onnxruntime), with their loss."),
    init: str | None = typer.Option(None, "--init", help="'random': export a freshly initialised model of --config."),
    config: str | None = typer.Option(None, "--config", help="Architecture config name or TOML (with --init)."),
    seed: int = typer.Option(0, help="Seed of the random initialisation (with --init random)."),
    no_fuse_decode: bool = typer.Option(False, "--no-fuse-decode", help="Fused graphs output latents only."),
    no_openvino: bool = typer.Option(False, "--no-openvino", help="Skip the OpenVINO IR files."),
    stream_chunk: int = typer.Option(4, min=1, help="Latent frames per streaming-decoder call."),
    min_snr_db: float = typer.Option(60.0, help="Parity gate: minimum SNR of every backend vs torch."),
) -> None:
    """Export a model to an ONNX + OpenVINO bundle, with a parity gate against torch."""
    import logging

    try:
        step_list = tuple(int(s) for s in steps.split(",") if s.strip())
    except ValueError:
        typer.secho(f"error: --steps must be integers separated by commas, got {steps!r}", err=True, fg="red")
        raise typer.Exit(2) from None
    if (checkpoint is None) == (init is None):
        typer.secho("error: give either a CHECKPOINT or --init random --config NAME", err=True, fg="red")
        raise typer.Exit(2)
    if init is not None and (init != "random" or config is None):
        typer.secho("error: --init takes 'random' and needs --config NAME (e.g. tiny, cpu)", err=True, fg="red")
        raise typer.Exit(2)
    if checkpoint is not None and config is not None:
        typer.secho("error: --config is only for --init random (a checkpoint carries its config)", err=True, fg="red")
        raise typer.Exit(2)
    logging.getLogger("onnxscript").setLevel(logging.WARNING)

    from ..train.checkpoint import init_random, load_model_checkpoint
    from ..train.models.config import load_model_config
    from .parity import ParityError
    from .pipeline import ExportOptions, export_bundle

    try:
        opts = ExportOptions(
            steps=step_list,
            int8=int8,
            fuse_decode=not no_fuse_decode,
            openvino=not no_openvino,
            stream_chunk=stream_chunk,
            min_snr_db=min_snr_db,
        )
        src = init_random(load_model_config(config), seed) if init else load_model_checkpoint(checkpoint)
        out = export_bundle(src, output, opts)
    except (ValueError, FileNotFoundError, FileExistsError, ParityError) as e:
        typer.secho(f"error: {e}", err=True, fg="red")
        raise typer.Exit(1) from None
    from ..bundle import Bundle
    from ..cli_runtime import describe

    typer.echo(describe(Bundle.open(out)))
