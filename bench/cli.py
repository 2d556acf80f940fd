"""`soundctm-rt bench ...`: the CPU benchmark (the group's default) and the daemon's latency/soak benches."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(
    help="Benchmarks. Without a subcommand: per-step RTF on this machine (--device cpu).",
    invoke_without_command=True,
)


def _step_list(flag: str, text: str) -> list[int]:
    try:
        out = [int(s) for s in text.split(",") if s.strip()]
        if not out or any(not 1 <= s <= 64 for s in out):
            raise ValueError
    except ValueError:
        typer.secho(f"error: {flag} must be integers in [1, 64] separated by commas, got {text!r}", err=True, fg="red")
        raise typer.Exit(2) from None
    return out


@app.callback()
def cpu(
    ctx: typer.Context,
    device: str = typer.Option("cpu", help="cpu (gpu/npu where the backend has them)."),
    backend: str = typer.Option("all", help="onnxruntime, openvino or all."),
    steps: str = typer.Option("1,2,4,8,16", help="Step counts, comma-separated."),
    bundle: Path | None = typer.Option(None, help="Bundle (default: the shipped model)."),
    runs: int = typer.Option(20, min=1, help="Timed runs per cell, after warm-up."),
    warmup: int = typer.Option(3, min=0, help="Untimed runs per cell first."),
    threads: int | None = typer.Option(None, min=1, help="Intra-op threads (default: all cores)."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the full report as JSON."),
    plot_path: Path | None = typer.Option(None, "--plot", help="Write a PNG plot of RTF per step count."),
    no_torch: bool = typer.Option(False, "--no-torch", help="Skip the torch-eager comparison."),
    profile: bool = typer.Option(False, "--profile", help="Also profile a student step by operator type."),
    variations: str = typer.Option(
        "1,4,16", help="Batch sizes for K takes of one prompt (generate_variations); '' skips this part."
    ),
    variation_takes: int = typer.Option(16, min=1, help="Takes per variations run (K)."),
    cold_runs: int = typer.Option(
        3, min=0, help="Cold starts timed per backend: new `generate` and `serve` processes (0 skips them)."
    ),
    int8: Path | None = typer.Option(
        None, "--int8", help="Also time INT8 against float32 on this bundle (exported with --int8, same weights)."
    ),
    int8_steps: str = typer.Option("1,2", help="Step counts for the --int8 comparison."),
) -> None:
    """Per backend and step count: RTF end to end and per stage, p50/p95/p99, vs torch eager and the peak."""
    if ctx.invoked_subcommand is not None:
        return
    from ..bundle import BundleError, resolve_bundle
    from .cpu import format_table, plot, run_cpu_bench

    backends = ["onnxruntime", "openvino"] if backend == "all" else [backend]
    if any(b not in ("onnxruntime", "openvino") for b in backends):
        typer.secho(f"error: --backend must be onnxruntime, openvino or all, not {backend!r}", err=True, fg="red")
        raise typer.Exit(2)
    step_list = _step_list("--steps", steps)
    int8_step_list = _step_list("--int8-steps", int8_steps)
    from ..engine import MAX_BATCH

    try:
        batch_list = [int(s) for s in variations.split(",") if s.strip()]
        if any(not 1 <= b <= MAX_BATCH for b in batch_list):
            raise ValueError
    except ValueError:
        typer.secho(
            f"error: --variations must be batch sizes in [1, {MAX_BATCH}] separated by commas, got {variations!r}",
            err=True,
            fg="red",
        )
        raise typer.Exit(2) from None
    try:
        report = run_cpu_bench(
            resolve_bundle(bundle),
            backends,
            step_list,
            runs,
            warmup,
            threads,
            torch_eager=not no_torch,
            device=device,
            variation_batches=batch_list,
            variation_takes=variation_takes,
            cold_runs=cold_runs,
            int8_bundle=int8,
            int8_steps=int8_step_list,
        )
    except BundleError as e:
        typer.secho(f"error: {e}", err=True, fg="red")
        raise typer.Exit(1) from None  # a failure; the checks above exit 2 for a wrong command line
    if profile:
        from ..bundle import Bundle
        from .profile import format_profile, profile_student_step

        opened = Bundle.open(resolve_bundle(bundle))
        report["student_step_profile"] = {b: profile_student_step(opened, threads=threads, backend=b) for b in backends}
    typer.echo(format_table(report))
    if profile:
        for p in report["student_step_profile"].values():
            typer.echo(format_profile(p))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    if plot_path:
        plot(report, plot_path)


from .int8_quality import int8_quality  # noqa: E402
from .latency import latency  # noqa: E402
from .soak import soak  # noqa: E402
from .speedups import speedups  # noqa: E402

app.command()(latency)
app.command()(soak)
app.command()(speedups)
app.command("int8-quality")(int8_quality)
