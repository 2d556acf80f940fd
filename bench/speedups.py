"""`soundctm-rt bench speedups`: what each CPU optimisation of the student step buys, measured in one run.

On one bundle's `student_step` at batch 1, per backend, in interleaved rounds (so that all variants see the same
load), the variants are:
- dynamic shapes: the graph as a plain session would open it (batch dimension left dynamic);
- static shapes: the batch pinned at session creation (what the Engine does, backends.py);
- static + CPU fusion: the graph after export/cpu_fusion.py's rewrites (FastGelu, MultiHeadAttention). A bundle
  exported with the fusion already has it: that variant is then the bundle's graph, and the unfused graph is not
  available, so the fusion is not ablated (exported with --no-cpu-fusion, the bench applies it itself).
Reported per variant: median wall ms, median process CPU ms (robust on a busy machine at 1 thread), and the
speed-up over the first variant (median over rounds of the per-round ratio). OpenVINO's compiled-model cache is
measured as the time to open the session cold, writing the cache, and from the cache.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import typer

from ..backends import BATCH_DIM, pin_batch
from ..bundle import Bundle, BundleError, resolve_bundle
from .machine import fingerprint, matmul_peak_gflops


def _ort(model: str | bytes, threads: int, batch: int | None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    if batch is not None:
        so.add_free_dimension_override_by_name(BATCH_DIM, batch)
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    return lambda feeds: sess.run(None, feeds)


def _openvino(
    model: str | bytes, threads: int, batch: int | None, cache_dir: str | None = None, weights: str | None = None
) -> Any:
    import openvino as ov

    core = ov.Core()
    if isinstance(model, bytes):
        m = core.read_model(model, b"")
    else:
        m = core.read_model(model, weights) if weights else core.read_model(model)
    if batch is not None:
        pin_batch(ov, m, batch)
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    config["INFERENCE_NUM_THREADS"] = threads
    if cache_dir:
        config["CACHE_DIR"] = cache_dir
    compiled = core.compile_model(m, "CPU", config)
    req = compiled.create_infer_request()

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        req.infer(feeds)
        return [np.array(req.get_output_tensor(i).data) for i in range(len(compiled.outputs))]

    run.core = core  # type: ignore[attr-defined]  # the compiled model needs its Core alive
    return run


def _feeds(bundle: Bundle) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for i in bundle.graph("student_step").inputs:
        shape = [d if isinstance(d, int) else 1 for d in i["shape"]]
        feeds[i["name"]] = rng.standard_normal(shape).astype(np.float32)
    feeds["x"] *= 10.0
    feeds["t"][:] = 10.0
    feeds["s"][:] = 1.0
    feeds["omega"][:] = 3.5
    feeds["token_mask"][:] = 1.0
    feeds["token_mask"][:, feeds["token_mask"].shape[1] // 2 :] = 0.0  # a short prompt: the mask matters
    return feeds


def _fused_bytes(path: Path) -> bytes | None:
    """The student step with export's CPU fusion applied, serialised with its weights; None without onnx."""
    try:
        import onnx

        from ..export.cpu_fusion import fuse_for_cpu
    except ImportError:
        return None
    model = onnx.load(str(path), load_external_data=True)
    fuse_for_cpu(model)
    return model.SerializeToString()


def measure(variants: dict[str, Any], feeds: dict[str, np.ndarray], rounds: int, per: int = 3) -> dict[str, Any]:
    """Interleaved rounds over the variants; wall and CPU medians (ms), speed-up over the first variant."""
    names = list(variants)
    outs = {k: fn(feeds)[0] for k, fn in variants.items()}  # warm-up, and the outputs agree
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    ratio: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(rounds):
        med = {}
        for k in names:
            w = []
            for _ in range(per):
                c0, t0 = time.process_time(), time.perf_counter()
                variants[k](feeds)
                w.append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
            wall[k] += w
            med[k] = float(np.median(w))
        for k in names:
            ratio[k].append(med[names[0]] / med[k])
    ref = outs[names[0]]
    return {
        k: {
            "wall_ms_p50": 1e3 * float(np.median(wall[k])),
            "cpu_ms_p50": 1e3 * float(np.median(cpu[k])),
            "speedup_wall": float(np.median(ratio[k])),
            "speedup_cpu": float(np.median(cpu[names[0]]) / np.median(cpu[k])),
            "max_abs_diff": float(np.max(np.abs(outs[k] - ref))),
        }
        for k in names
    }


def matmul_peak_cpu_gflops(n: int = 1024, repeats: int = 8) -> float:
    """fp32 matmul GFLOP/s per CPU-second of one core (numpy's BLAS on one thread): the peak for CPU-time figures,
    which other processes on the machine shrink far less than wall-clock figures."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)

    def best() -> float:
        a @ b
        t = float("inf")
        for _ in range(repeats):
            c0 = time.process_time()
            a @ b
            t = min(t, time.process_time() - c0)
        return 2 * n**3 / t / 1e9

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return best()
    with threadpool_limits(limits=1, user_api="blas"):
        return best()


def openvino_cache_ms(path: str | bytes, threads: int, weights: str | None = None) -> dict[str, float]:
    """Session opening time of the student step: no cache, writing the cache, reading it."""
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        for label, cache_dir in (("no_cache", None), ("cache_write", cache), ("cache_read", cache)):
            t0 = time.perf_counter()
            _openvino(path, threads, 1, cache_dir, weights)
            out[label] = 1e3 * (time.perf_counter() - t0)
    return out


def run_speedups(bundle_path: Path, backends: list[str], threads: int, rounds: int) -> dict[str, Any]:
    bundle = Bundle.open(bundle_path)
    spec = bundle.graph("student_step")
    feeds = _feeds(bundle)
    already = spec.attrs.get("cpu_fusion")
    fused = None if already else _fused_bytes(bundle.path(spec.files["onnxruntime"]))
    flops = int(spec.attrs.get("flops", 0))
    peak, how = matmul_peak_gflops(threads=threads)
    peak_cpu = matmul_peak_cpu_gflops()
    report: dict[str, Any] = {
        "machine": fingerprint(),
        "bundle": {"path": str(bundle.root), "name": bundle.name, "student_flops_per_step": flops},
        "threads": threads,
        "rounds": rounds,
        "peak_gflops": peak,
        "peak_how": how,
        "peak_gflops_cpu_time": peak_cpu,
        "cpu_fusion_in_bundle": already,
        "backends": {},
    }
    if fused is None and not already:
        report["note"] = "onnx is not installed: the CPU fusion is not measured"
    for backend in backends:
        if backend not in spec.files:
            continue
        path = str(bundle.path(spec.files[backend]))
        w = spec.weights.get(backend)
        weights = str(bundle.path(w)) if backend == "openvino" and w else None  # OpenVINO IR and its shared .bin
        label = "static + CPU fusion (bundle)" if already else "static shapes"
        if backend == "onnxruntime":
            variants = {"dynamic shapes": _ort(path, threads, None), label: _ort(path, threads, 1)}
        else:
            variants = {
                "dynamic shapes": _openvino(path, threads, None, weights=weights),
                label: _openvino(path, threads, 1, weights=weights),
            }
        if fused is not None:
            variants["static + CPU fusion"] = (_ort if backend == "onnxruntime" else _openvino)(fused, threads, 1)
        rows = measure(variants, feeds, rounds)
        for r in rows.values():
            # CPU time sums the threads: FLOPs per CPU-second against one core's peak per CPU-second
            r["fraction_of_peak_cpu"] = flops / (r["cpu_ms_p50"] / 1e3) / 1e9 / peak_cpu
            r["fraction_of_peak_wall"] = flops / (r["wall_ms_p50"] / 1e3) / 1e9 / peak
        entry: dict[str, Any] = {"variants": rows}
        if backend == "openvino":
            entry["session_open_ms"] = openvino_cache_ms(path, threads, weights)
        report["backends"][backend] = entry
    return report


def format_speedups(rep: dict[str, Any]) -> str:
    m = rep["machine"]
    lines = [
        f"student step, batch 1, {rep['threads']} thread(s), {rep['rounds']} interleaved rounds on "
        f"{m.get('cpu_model', m['machine'])} (load at start {m.get('loadavg_at_start')}); matmul peak "
        f"{rep['peak_gflops']:.1f} GFLOP/s wall ({rep['peak_how']}), {rep['peak_gflops_cpu_time']:.1f} per CPU-second "
        "of one core",
        f"{'backend':<12}{'variant':<30}{'wall ms':>9}{'CPU ms':>9}{'x (wall)':>10}{'x (CPU)':>9}"
        f"{'%peak wall':>11}{'%peak CPU':>10}{'max diff':>10}",
    ]
    for backend, e in rep["backends"].items():
        for name, r in e["variants"].items():
            lines.append(
                f"{backend:<12}{name:<30}{r['wall_ms_p50']:>9.2f}{r['cpu_ms_p50']:>9.2f}{r['speedup_wall']:>10.2f}"
                f"{r['speedup_cpu']:>9.2f}{100 * r['fraction_of_peak_wall']:>10.0f}%"
                f"{100 * r['fraction_of_peak_cpu']:>9.0f}%{r['max_abs_diff']:>10.1e}"
            )
        if "session_open_ms" in e:
            s = e["session_open_ms"]
            lines.append(
                f"{backend:<12}session open: no cache {s['no_cache']:.0f} ms, writing the cache "
                f"{s['cache_write']:.0f} ms, from the cache {s['cache_read']:.0f} ms"
            )
    if rep.get("note"):
        lines.append(f"note: {rep['note']}")
    return "\n".join(lines) + "\n"


def speedups(
    bundle: Path | None = typer.Option(None, help="Bundle (default: the shipped model)."),
    backend: str = typer.Option("all", help="onnxruntime, openvino or all."),
    threads: int = typer.Option(1, min=1, help="Intra-op threads (1: CPU time is a fair measure under load)."),
    rounds: int = typer.Option(12, min=1, help="Interleaved rounds (3 calls of each variant per round)."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the report as JSON."),
) -> None:
    """What static shapes, the CPU fusion and OpenVINO's model cache buy on the student step, in one run."""
    import json

    backends = ["onnxruntime", "openvino"] if backend == "all" else [backend]
    if any(b not in ("onnxruntime", "openvino") for b in backends):
        typer.secho(f"error: --backend must be onnxruntime, openvino or all, not {backend!r}", err=True, fg="red")
        raise typer.Exit(2)
    try:
        rep = run_speedups(resolve_bundle(bundle), backends, threads, rounds)
    except BundleError as e:
        typer.secho(f"error: {e}", err=True, fg="red")
        raise typer.Exit(1) from None
    typer.echo(format_speedups(rep))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(rep, indent=2) + "\n")


__all__ = ["run_speedups", "speedups"]
