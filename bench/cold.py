"""Cold start: what a user waits for from a fresh process, before any cache of this process exists.

- `generate`: `soundctm-rt generate PROMPT -o FILE` from the process's start to its exit (the file is written
  last); the process also reports its own stages (`--json`), so the wait splits into start-up and the take.
- `serve`: `soundctm-rt serve --port 0 --no-audio` from the process's start to its `listening on` line.

Each is a new Python process, as a user's shell starts it (`python -m soundctm_rt`, the console script's code).
The OS file cache is warm after the first run, as it is for a user's second command; the first run is kept apart.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .process import serve_process

PROMPT = "a tight hand clap"


def _generate_once(bundle: Path, backend: str, threads: int | None, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "soundctm_rt", "generate", PROMPT, "-o", str(out), "--json"]
    cmd += ["--bundle", str(bundle), "--backend", backend]
    if threads:
        cmd += ["--threads", str(threads)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t0
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"cold generate failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    take: dict[str, Any] = next((json.loads(ln) for ln in done.stdout.splitlines() if ln.startswith("{")), {})
    out.unlink()
    return {"wall_ms": 1e3 * wall, "take_ms": float(take.get("total_ms", float("nan")))}


def _serve_once(bundle: Path, backend: str, threads: int | None) -> float:
    args = ["--no-audio", "--bundle", str(bundle), "--backend", backend]
    if threads:
        args += ["--threads", str(threads)]
    t0 = time.perf_counter()
    with serve_process(args, timeout=300):
        return 1e3 * (time.perf_counter() - t0)


def cold_start(bundle: Path, backend: str, runs: int = 3, threads: int | None = None) -> dict[str, Any]:
    """Median, min and max wall milliseconds of `runs` cold `generate` and `serve` starts (after one untimed run
    each, which warms the OS file cache)."""
    with tempfile.TemporaryDirectory(prefix="soundctm-cold-") as tmp:
        out = Path(tmp) / "take.wav"
        first = _generate_once(bundle, backend, threads, out)
        gens = [_generate_once(bundle, backend, threads, out) for _ in range(runs)]
    first_serve = _serve_once(bundle, backend, threads)
    serves = [_serve_once(bundle, backend, threads) for _ in range(runs)]
    walls = [g["wall_ms"] for g in gens]
    takes = [g["take_ms"] for g in gens]
    return {
        "backend": backend,
        "runs": runs,
        "prompt": PROMPT,
        "generate_wall_ms": _stats(walls),
        "generate_take_ms": _stats(takes),  # the take itself (text, sampling, decoding), as the process timed it
        "generate_startup_ms_p50": float(np.median(np.subtract(walls, takes))),
        "generate_first_run_ms": first["wall_ms"],
        "serve_ready_ms": _stats(serves),
        "serve_first_run_ms": first_serve,
    }


def _stats(v: list[float]) -> dict[str, float]:
    return {"p50": float(np.median(v)), "min": float(np.min(v)), "max": float(np.max(v))}


def format_cold(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["cold start (new processes, OS file cache warm; wall ms, median [min, max])"]
    for r in rows:
        g, s = r["generate_wall_ms"], r["serve_ready_ms"]
        lines.append(
            f"{r['backend']:<12}generate to file {g['p50']:.0f} [{g['min']:.0f}, {g['max']:.0f}] "
            f"(take {r['generate_take_ms']['p50']:.0f}, start-up {r['generate_startup_ms_p50']:.0f}); "
            f"serve to listening {s['p50']:.0f} [{s['min']:.0f}, {s['max']:.0f}]"
        )
    return lines
