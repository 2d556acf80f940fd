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
    weights: str = typer.Option("fp32", help="Weight storage: fp32, or fp16 (rounded, computed in float32)."),
    int8_embeddings: bool = typer.Option(
        False, "--int8-embeddings", help="Store the text encoder's word-embedding table as INT8."
    ),
    openvino_format: str = typer.Option(
        "ir", help="OpenVINO files: ir (its own IR and weights), or onnx (OpenVINO compiles the ONNX files)."
    ),
    compact: bool = typer.Option(
        False,
        "--compact",
        help="The shipped bundle's options: --weights fp16 --int8-embeddings --openvino-format onnx.",
    ),
    default_steps: int | None = typer.Option(
        None, "--default-steps", help="The bundle's default step count (one of --steps; default: the config's)."
    ),
    captions: Path | None = typer.Option(
        None,
        help="CSV with a caption column (a prepared dataset's clips.csv): the training captions the bundle lists "
        "as known prompts (the runtime warns about prompts far from all of them), and the compact text encoder's "
        "check. A corpus column, if there, is listed too.",
    ),
    no_cpu_fusion: bool = typer.Option(
        False, "--no-cpu-fusion", help="Keep the student's graphs as exported (no fused GELU/attention operators)."
    ),
    no_batched_fused: bool = typer.Option(
        False, "--no-batched-fused", help="Fused graphs take one take (batch 1) instead of a batch of takes."
    ),
    decoder_iterations: int | None = typer.Option(
        None,
        "--decoder-iterations",
        min=0,
        max=64,
        help="A mel model's Griffin-Lim iterations, written to the bundle (default: the model config's).",
    ),
) -> None:
    """Export a model to an ONNX + OpenVINO bundle, with a parity gate against torch."""
    import logging

    from ..bundle import Bundle, BundleError

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
    from .compact import read_captions
    from .known_prompts import read_corpora
    from .parity import ParityError
    from .pipeline import COMPACT, ExportOptions, export_bundle

    try:
        compact_opts: dict = dict(COMPACT) if compact else {}
        caption_list = tuple(read_captions(captions)) if captions else ()
        opts = ExportOptions(
            weights=compact_opts.get("weights", weights),
            int8_embeddings=compact_opts.get("int8_embeddings", int8_embeddings),
            openvino_format=compact_opts.get("openvino_format", openvino_format),
            captions=caption_list,
            caption_corpora=read_corpora(captions, caption_list) if captions else (),
            default_steps=default_steps,
            steps=step_list,
            int8=int8,
            fuse_decode=not no_fuse_decode,
            openvino=not no_openvino,
            stream_chunk=stream_chunk,
            min_snr_db=min_snr_db,
            cpu_fusion=not no_cpu_fusion,
            batched_fused=not no_batched_fused,
            decoder_iterations=decoder_iterations,
        )
        if init:
            assert config is not None  # checked above: --init random needs --config
            src = init_random(load_model_config(config), seed)
        else:
            assert checkpoint is not None  # checked above: one of CHECKPOINT and --init
            src = load_model_checkpoint(checkpoint)
        out = export_bundle(src, output, opts)
        bundle = Bundle.open(out)  # what the runtime will read, checked as it will check it
    except (ValueError, FileNotFoundError, FileExistsError, ParityError, BundleError) as e:
        typer.secho(f"error: {e}", err=True, fg="red")
        raise typer.Exit(1) from None  # a failure; the checks above exit 2 for a wrong command line
    from ..cli_runtime import describe

    typer.echo(describe(bundle))
