"""Machine fingerprint and measured fp32 matmul peak, recorded with every benchmark."""

from __future__ import annotations

import os
import platform
import time
from typing import Any

import numpy as np


def fingerprint() -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "numpy": np.__version__,
    }
    try:
        text = open("/proc/cpuinfo").read()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
        info["cpu_flags"] = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))
    except OSError:
        pass
    from ..backends import cpu_features

    info["cpu_features"] = cpu_features()  # VNNI / AVX-512 / AMX decide what INT8 gains
    try:
        mem = next(ln for ln in open("/proc/meminfo") if ln.startswith("MemTotal"))
        info["mem_gb"] = round(int(mem.split()[1]) / 1e6, 1)
    except (OSError, StopIteration):
        pass
    if hasattr(os, "getloadavg"):
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    for mod in ("onnxruntime", "openvino", "torch"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    return info


def matmul_peak_gflops(n: int = 1024, repeats: int = 8, threads: int | None = None) -> tuple[float, str]:
    """Best achieved fp32 GFLOP/s of an n×n matmul (numpy's BLAS): the practical peak for `threads` threads.

    Returns (GFLOP/s, how): "measured" with the BLAS limited to `threads` (needs threadpoolctl), or
    "scaled" when only the all-core figure could be measured and is scaled by threads / cores.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if threads is None or threads >= cores:
        return _matmul_gflops(n, repeats), "measured"
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return _matmul_gflops(n, repeats) * threads / cores, "scaled"
    with threadpool_limits(limits=threads, user_api="blas"):
        return _matmul_gflops(n, repeats), "measured"


def _matmul_gflops(n: int, repeats: int) -> float:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up: thread pool start, page faults
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9
