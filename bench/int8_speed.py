"""The INT8 variants' speed against float32, inside `soundctm-rt bench --int8 BUNDLE`.

The INT8 graphs are never the default and are not in the shipped bundle (they would push it over its size
budget), so the bench takes a bundle exported with `--int8` from the same weights and times, per backend, its
float32 and INT8 engines one generation after the other (interleaved: both see the same load). Per step count:
the student step (host path) and the whole take (fused path where the bundle has one), medians over the runs,
and the ratio. The CPU's features go into the report because the gain depends on them (VNNI, AMX, AVX-512).
Quality (FD, KID, adherence) needs the evaluation data: `soundctm-rt bench int8-quality`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..backends import cpu_features
from ..bundle import Bundle, BundleError
from ..engine import Engine, Timing
from .cpu import step_paths

log = logging.getLogger(__name__)


def bench_int8(
    engines: dict[str, Engine], steps_list: list[int], runs: int, warmup: int, prompt: str
) -> list[dict[str, Any]]:
    """Float32 vs INT8 engines ({"fp32": ..., "int8": ...}) of one backend, one generation after the other: per
    step count, step ms (host) and take ms (fused), medians and ratios."""
    backend = engines["fp32"].opts.backend
    rows = []
    for steps in steps_list:
        for path in step_paths(engines["fp32"], steps):
            timings: dict[str, list[Timing]] = {"fp32": [], "int8": []}
            for i in range(warmup + runs):
                for name, eng in engines.items():
                    _, t = eng.generate(prompt, seed=i, steps=steps, fused=(path == "fused"))
                    if i >= warmup:
                        timings[name].append(t)
            row: dict[str, Any] = {"backend": backend, "steps": steps, "path": path, "runs": runs}
            for name, ts in timings.items():
                row[f"{name}_total_ms"] = float(np.median([t.total_ms for t in ts]))
                row[f"{name}_rtf"] = float(np.median([t.rtf for t in ts]))
                if path == "host":
                    row[f"{name}_step_ms"] = float(np.median([s for t in ts for s in t.step_ms]))
            row["speedup_total"] = row["fp32_total_ms"] / row["int8_total_ms"]
            if path == "host":
                row["speedup_step"] = row["fp32_step_ms"] / row["int8_step_ms"]
            rows.append(row)
            log.info("int8 %s %d steps %s: x%.2f", backend, steps, path, row.get("speedup_step", row["speedup_total"]))
    return rows


def run_int8_bench(
    bundle_path: Path,
    backends: list[str],
    steps_list: list[int],
    runs: int,
    warmup: int,
    threads: int | None,
    device: str,
    prompt: str,
) -> dict[str, Any]:
    """`bench_int8` on each backend the INT8 bundle has variants for, with the CPU's features."""
    bundle = Bundle.open(bundle_path)
    if not bundle.spec.int8:
        raise BundleError(f"{bundle.root} has no INT8 variants: export it with --int8")
    have = {b for v in bundle.spec.int8.values() for b in v.files}
    out: dict[str, Any] = {"bundle": str(bundle.root), "cpu_features": cpu_features(), "backends": []}
    t0 = time.perf_counter()
    for backend in backends:
        if backend not in have:
            out.setdefault("skipped", []).append(f"{backend}: the bundle has no INT8 variant for it")
            continue
        engines = {
            name: Engine(bundle, backend=backend, device=device, threads=threads, warmup=True, int8=name == "int8")
            for name in ("fp32", "int8")
        }
        out["backends"].append({"backend": backend, "rows": bench_int8(engines, steps_list, runs, warmup, prompt)})
    out["seconds"] = time.perf_counter() - t0
    return out


def format_int8(report: dict[str, Any]) -> list[str]:
    f = report["cpu_features"]
    feats = ", ".join(k for k in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f.get(k)) or "none"
    lines = [
        f"INT8 vs float32 ({report['bundle']}; interleaved, medians; CPU features: {feats})",
        f"{'backend':<12}{'steps':>5} {'path':<6}{'fp32 ms':>9}{'int8 ms':>9}{'x total':>9}"
        f"{'fp32 step':>10}{'int8 step':>10}{'x step':>8}",
    ]
    for b in report["backends"]:
        for r in b["rows"]:
            step = (
                f"{r['fp32_step_ms']:>10.2f}{r['int8_step_ms']:>10.2f}{r['speedup_step']:>8.2f}"
                if "speedup_step" in r
                else f"{'-':>10}{'-':>10}{'-':>8}"
            )
            lines.append(
                f"{r['backend']:<12}{r['steps']:>5} {r['path']:<6}{r['fp32_total_ms']:>9.2f}{r['int8_total_ms']:>9.2f}"
                f"{r['speedup_total']:>9.2f}{step}"
            )
    lines += [f"INT8 skipped: {s}" for s in report.get("skipped", [])]
    return lines
