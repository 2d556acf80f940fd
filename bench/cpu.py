"""`soundctm-rt bench --device cpu`: per backend and step count, RTF end to end and per stage.

Every figure is measured in this run: warm-up first, then `runs` timed generations, p50/p95/p99. The torch
figure runs the same student weights (read back from the bundle's ONNX file) in torch eager in this process,
so the backend-vs-torch ratio is taken on one machine in one run. The student's achieved FLOP/s is its FLOPs
per step (counted from the graph at export) over the measured step time, against numpy's measured fp32
matmul peak on all cores.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..engine import Engine, Timing
from ..logs import task_bar
from .machine import fingerprint, matmul_peak_gflops

log = logging.getLogger(__name__)
PROMPT = "Roland TR-808 snare drum"


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def _summary(backend: str, steps: int, path: str, timings: list[Timing], flops_step: int) -> dict[str, Any]:
    rtf = [t.rtf for t in timings]
    step = [s for t in timings for s in t.step_ms]
    stages: dict[str, float] = {
        "text": pct([t.text_ms for t in timings], 50),
        "sample": pct([t.sample_ms for t in timings], 50),
        "decode": pct([t.decode_ms for t in timings], 50),
        "total": pct([t.total_ms for t in timings], 50),
    }
    row: dict[str, Any] = {
        "backend": backend,
        "steps": steps,
        "path": path,
        "rtf_p50": pct(rtf, 50),
        "rtf_p95": pct(rtf, 95),
        "rtf_p99": pct(rtf, 99),
        "stages_ms": stages,
        "audio_seconds": timings[0].audio_seconds,
        "runs": len(timings),
        "total_ms_p50": stages["total"],
        "total_ms_p99": pct([t.total_ms for t in timings], 99),
    }
    if step:
        stages["step"] = pct(step, 50)
        stages["step_p99"] = pct(step, 99)
        row["step_rtf_p50"] = stages["step"] / 1e3 / timings[0].audio_seconds
        row["student_gflops"] = flops_step / (stages["step"] / 1e3) / 1e9 if flops_step else None
    return row


def step_paths(eng: Engine, steps: int) -> list[str]:
    """The paths a step count is timed on: the fused graph where the bundle has one, and the host loop."""
    return (["fused"] if eng.has_fused(steps) else []) + ["host"]


def bench_backend(
    bundle: Bundle,
    backend: str,
    steps_list: list[int],
    runs: int,
    warmup: int,
    threads: int | None,
    device: str,
    bar: Any = None,
) -> list[dict[str, Any]]:
    eng = Engine(bundle, backend=backend, device=device, threads=threads, warmup=True)
    flops_step = int(bundle.graph("student_step").attrs.get("flops", 0))
    rows = []
    for steps in steps_list:
        for path in step_paths(eng, steps):
            timings = []
            for i in range(warmup + runs):
                eng._cache.clear()  # text encoding is part of every measured generation
                _, t = eng.generate(PROMPT, seed=i, steps=steps, fused=(path == "fused"))
                if i >= warmup:
                    timings.append(t)
            rows.append(_summary(backend, steps, path, timings, flops_step))
            log.info("%s %d steps %s: RTF p50 %.4f", backend, steps, path, rows[-1]["rtf_p50"])
            if bar is not None:
                bar.update()
    return rows


def bench_variations(
    bundle: Bundle,
    backend: str,
    batches: list[int],
    takes: int,
    rounds: int,
    threads: int | None,
    device: str,
    steps: int | None = None,
) -> list[dict[str, Any]]:
    """Takes per second of `takes` variations of one prompt: one after another with `generate` (sequential), and
    through `generate_variations` at each batch size. Decoding is part of every take. Rounds interleave the modes,
    so that their ratio is measured under the same load; medians over rounds."""
    eng = Engine(bundle, backend=backend, device=device, threads=threads, warmup=True)
    steps = steps or eng.defaults["steps"]
    eng.encode_prompt(PROMPT)  # a variation run encodes its prompt once; so does a sequential run after the first

    def sequential() -> list[Timing]:
        return [eng.generate(PROMPT, seed=i, steps=steps)[1] for i in range(takes)]

    def batched(b: int) -> list[Timing]:
        return [t.timing for t in eng.generate_variations(PROMPT, takes, seed=0, steps=steps, batch=b)]

    modes: dict[str, Any] = {"sequential": sequential, **{f"batch {b}": (lambda b=b: batched(b)) for b in batches}}
    for fn in modes.values():  # warm-up: opens every batch size's sessions
        fn()
    wall: dict[str, list[float]] = {m: [] for m in modes}
    last: dict[str, list[Timing]] = {}
    for _ in range(rounds):
        for m, fn in modes.items():
            t0 = time.perf_counter()
            last[m] = fn()
            wall[m].append(time.perf_counter() - t0)
    rows = []
    seq = float(np.median(wall["sequential"]))
    for m in modes:
        w = float(np.median(wall[m]))
        ts = last[m]
        sampled = {id(t): t for t in ts}  # per take: its batch's sampling time is shared by the batch
        row = {
            "backend": backend,
            "steps": steps,
            "takes": takes,
            "mode": "sequential" if m == "sequential" else "batch",
            "batch": None if m == "sequential" else int(m.split()[1]),
            "path": ts[0].path,
            "takes_per_s": takes / w,
            "speedup_vs_sequential": seq / w,
            "sample_ms_per_take": float(np.sum([t.sample_ms / t.batch for t in sampled.values()]) / takes),
            "decode_ms_per_take": float(np.mean([t.decode_ms for t in ts])),
            "rounds": rounds,
        }
        rows.append(row)
        log.info("%s %s: %.1f takes/s (x%.2f)", backend, m, row["takes_per_s"], row["speedup_vs_sequential"])
    return rows


def bench_torch_eager(
    bundle: Bundle, steps_list: list[int], runs: int, warmup: int, threads: int | None, bar: Any = None
) -> tuple[list[dict[str, Any]], str | None]:
    """The same student in torch eager, per step. Returns (rows, reason it was skipped or None)."""
    try:
        import torch

        from .torch_student import load_student_from_bundle
    except ImportError as e:
        return [], f"torch or the export extra is not installed ({e})"
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        step, feeds = load_student_from_bundle(bundle)
    except (KeyError, ValueError) as e:
        return [], f"could not rebuild the student in torch: {e}"
    audio_seconds = bundle.manifest["latent"]["frames"] * bundle.manifest["latent"]["hop"] / bundle.sample_rate
    flops_step = int(bundle.graph("student_step").attrs.get("flops", 0))
    rows = []
    with torch.inference_mode():
        for steps in steps_list:
            times: list[float] = []
            per_gen: list[float] = []
            for i in range(warmup + runs):
                t_gen = 0.0
                for _ in range(steps):
                    t0 = time.perf_counter()
                    step(*feeds)
                    dt = 1e3 * (time.perf_counter() - t0)
                    t_gen += dt
                    if i >= warmup:
                        times.append(dt)
                if i >= warmup:
                    per_gen.append(t_gen)
            rtf = [t / 1e3 / audio_seconds for t in per_gen]
            rows.append(
                {
                    "backend": "torch",
                    "steps": steps,
                    "path": "host",
                    "rtf_p50": pct(rtf, 50),
                    "rtf_p95": pct(rtf, 95),
                    "rtf_p99": pct(rtf, 99),
                    "stages_ms": {
                        "step": pct(times, 50),
                        "step_p99": pct(times, 99),
                        "sample": pct(per_gen, 50),
                    },
                    "audio_seconds": audio_seconds,
                    "runs": runs,
                    "step_rtf_p50": pct(times, 50) / 1e3 / audio_seconds,
                    "student_gflops": flops_step / (pct(times, 50) / 1e3) / 1e9 if flops_step else None,
                    "note": "student steps only (text encoding and decoding are not run in torch)",
                }
            )
            if bar is not None:
                bar.update()
    return rows, None


def run_cpu_bench(
    bundle_path: Path,
    backends: list[str],
    steps_list: list[int],
    runs: int = 20,
    warmup: int = 3,
    threads: int | None = None,
    torch_eager: bool = True,
    device: str = "cpu",
    variation_batches: list[int] | None = None,
    variation_takes: int = 16,
    variation_rounds: int = 3,
    cold_runs: int = 0,
    int8_bundle: Path | None = None,
    int8_steps: list[int] | None = None,
) -> dict[str, Any]:
    bundle = Bundle.open(bundle_path)
    report: dict[str, Any] = {
        "machine": fingerprint(),
        "bundle": {
            "path": str(bundle.root),
            "name": bundle.name,
            "fused_steps": bundle.fused_steps,
            "student_flops_per_step": int(bundle.graph("student_step").attrs.get("flops", 0)),
            "audio_seconds": bundle.manifest["latent"]["frames"]
            * bundle.manifest["latent"]["hop"]
            / bundle.sample_rate,
        },
        "settings": {
            "runs": runs,
            "warmup": warmup,
            "threads": threads or os.cpu_count(),
            "prompt": PROMPT,
            "device": device,
        },
    }
    cells = len(backends) * sum(1 + (s in bundle.fused_steps) for s in steps_list)
    bar = task_bar(
        cells
        + (len(steps_list) if torch_eager else 0)
        + (len(backends) if variation_batches else 0)
        + (len(backends) if cold_runs else 0)
        + (1 if int8_bundle else 0),
        "bench",
        log,
        logging.WARNING,  # shown unless -q: a full run takes minutes
    )
    # The peak is sampled between the parts and the best sample is the reference: on a shared machine a single
    # sample taken while a neighbour held the cores read half the GEMM rate of one a minute later (77 vs 155
    # GFLOP/s, AMD EPYC, 2 vCPUs), and every "% of peak" then came out over 100 %.
    peak_samples: list[float] = []

    def sample_peak() -> None:
        gflops, report["peak_how"] = matmul_peak_gflops(threads=threads)
        peak_samples.append(gflops)
        report["peak_gflops"], report["peak_samples_gflops"] = max(peak_samples), list(peak_samples)

    sample_peak()
    # torch first: onnxruntime's and OpenVINO's thread pools outlive their sessions in this process, and torch's
    # OpenMP threads measured after them on a contended machine were 5x slower than on their own.
    if torch_eager:
        rows, why = bench_torch_eager(bundle, steps_list, runs, warmup, threads, bar)
        report["torch_eager"] = rows
        if why:
            report["torch_eager_skipped"] = why
    else:
        report["torch_eager"] = []
        report["torch_eager_skipped"] = "--no-torch"
    results: list[dict[str, Any]] = []
    for backend in backends:
        sample_peak()
        results += bench_backend(bundle, backend, steps_list, runs, warmup, threads, device, bar)
    sample_peak()
    report["results"] = results
    if variation_batches:
        report["variations"] = []
        for backend in backends:
            report["variations"] += bench_variations(
                bundle, backend, variation_batches, variation_takes, variation_rounds, threads, device
            )
            bar.update()
    if cold_runs:
        from .cold import cold_start

        report["cold_start"] = []
        for backend in backends:
            report["cold_start"].append(cold_start(bundle.root, backend, cold_runs, threads))
            bar.update()
    if int8_bundle is not None:
        from .int8_speed import run_int8_bench

        report["int8"] = run_int8_bench(int8_bundle, backends, int8_steps or [1], runs, warmup, threads, device, PROMPT)
        bar.update()
    bar.close()
    report["warnings"] = machine_warnings(report["machine"], threads)
    report["ratios"] = ratios(report)
    return report


def machine_warnings(machine: dict[str, Any], threads: int | None) -> list[str]:
    """Say when the figures were taken on a machine that was already busy: multi-threaded inference then
    waits on cores other processes hold, and the figures say more about them than about the model."""
    load = (machine.get("loadavg_at_start") or [0.0])[0]
    cores = machine.get("cpus_usable") or 1
    used = threads or cores
    if load + used > cores + 0.5:
        advice = "rerun on an idle machine"
        free = max(1, cores - round(load))
        if free < used:
            advice += f" or with --threads {free}"
        return [
            f"the machine was busy at the start (load {load:.1f} on {cores} cores) and the bench uses {used} "
            f"thread(s): figures are pessimistic; {advice}"
        ]
    return []


def ratios(report: dict[str, Any]) -> dict[str, Any]:
    """Per-step speed-up of each backend over torch eager, and the student's share of the matmul peak."""
    out: dict[str, Any] = {}
    torch_step = {r["steps"]: r["stages_ms"]["step"] for r in report.get("torch_eager", [])}
    peak = report["peak_gflops"]
    for r in report["results"]:
        if r["path"] != "host" or "step" not in r["stages_ms"]:
            continue
        key = f"{r['backend']}_{r['steps']}step"
        if r["steps"] in torch_step:
            out[f"{key}_speedup_vs_torch"] = torch_step[r["steps"]] / r["stages_ms"]["step"]
        if r.get("student_gflops"):
            out[f"{key}_fraction_of_peak"] = r["student_gflops"] / peak
    return out


def format_table(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"machine: {m.get('cpu_model', m['machine'])}, {m['cpus_usable']} cores; fp32 matmul peak "
        f"{report['peak_gflops']:.1f} GFLOP/s ({report.get('peak_how', 'measured')} at the bench's thread count, "
        f"best of {len(report.get('peak_samples_gflops', [0]))} samples); "
        f"bundle {report['bundle']['name']} "
        f"({report['bundle']['audio_seconds']:.2f} s clips, {report['bundle']['student_flops_per_step'] / 1e6:.1f} "
        "MFLOP per student step)",
        f"{'backend':<12}{'steps':>5} {'path':<6}{'RTF p50':>9}{'p95':>9}{'p99':>9}{'text ms':>9}{'step ms':>9}"
        f"{'decode ms':>10}{'total ms':>10}{'GFLOP/s':>9}{'%peak':>7}",
    ]
    for r in report["results"] + report.get("torch_eager", []):
        st = r["stages_ms"]
        gf = r.get("student_gflops")
        lines.append(
            f"{r['backend']:<12}{r['steps']:>5} {r['path']:<6}{r['rtf_p50']:>9.4f}{r['rtf_p95']:>9.4f}"
            f"{r['rtf_p99']:>9.4f}{_f(st.get('text')):>9}{_f(st.get('step')):>9}{_f(st.get('decode')):>10}"
            f"{_f(st.get('total', st.get('sample'))):>10}{_f(gf):>9}"
            f"{_pct_of_peak(gf, report['peak_gflops']):>7}"
        )
    for w in report.get("warnings", []):
        lines.append(f"warning: {w}")
    if report.get("torch_eager_skipped"):
        lines.append(f"torch eager: skipped ({report['torch_eager_skipped']})")
    for k, v in report["ratios"].items():
        lines.append(f"{k}: {v:.2f}")
    if report.get("variations"):
        v0 = report["variations"][0]
        lines.append(
            f"variations: {v0['takes']} takes of one prompt at {v0['steps']} step(s), decoding included "
            "(rounds interleaved; speed-up against the same takes one after another)"
        )
        lines.append(
            f"{'backend':<12}{'mode':<12}{'path':<7}{'takes/s':>9}{'speed-up':>10}{'sample ms/take':>16}"
            f"{'decode ms/take':>16}"
        )
        for r in report["variations"]:
            mode = "sequential" if r["mode"] == "sequential" else f"batch {r['batch']}"
            lines.append(
                f"{r['backend']:<12}{mode:<12}{r['path']:<7}{r['takes_per_s']:>9.2f}{r['speedup_vs_sequential']:>10.2f}"
                f"{r['sample_ms_per_take']:>16.2f}{r['decode_ms_per_take']:>16.2f}"
            )
    if report.get("cold_start"):
        from .cold import format_cold

        lines += format_cold(report["cold_start"])
    if report.get("int8"):
        from .int8_speed import format_int8

        lines += format_int8(report["int8"])
    return "\n".join(lines) + "\n"


def _pct_of_peak(gf: float | None, peak: float) -> str:
    return f"{100 * gf / peak:.0f}%" if gf else "-"


def _f(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.2f}"


def plot(report: dict[str, Any], path: Path) -> None:
    """RTF p50 (bars: p50, whiskers to p99) per step count and backend, log scale."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from e
    rows = report["results"] + report.get("torch_eager", [])
    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        series.setdefault(f"{r['backend']} ({r['path']})", []).append(r)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, rs in series.items():
        xs = [r["steps"] for r in rs]
        ys = [r["rtf_p50"] for r in rs]
        err = [[0 for _ in rs], [r["rtf_p99"] - r["rtf_p50"] for r in rs]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("student steps")
    ax.set_ylabel("real-time factor (lower is faster)")
    ax.set_title(f"{report['bundle']['name']} on {report['machine'].get('cpu_model', '?')}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
