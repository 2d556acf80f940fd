"""Where a student step's time goes: onnxruntime's per-node profile, summed by operator type."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import Bundle


def profile_student_step(bundle: Bundle, runs: int = 20, threads: int | None = None) -> dict[str, Any]:
    """Run student_step `runs` times with profiling on; {op_type: share of node time} and the totals."""
    import onnxruntime as ort

    spec = bundle.graph("student_step")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or os.cpu_count() or 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        so.profile_file_prefix = str(Path(tmp) / "student_step")
        sess = ort.InferenceSession(str(bundle.path(spec.files["onnxruntime"])), so, providers=["CPUExecutionProvider"])
        feeds = {}
        rng = np.random.default_rng(0)
        for i in sess.get_inputs():
            shape = [1 if not isinstance(d, int) else d for d in i.shape]
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
        feeds["t"][:] = 10.0
        feeds["s"][:] = 1.0
        feeds["token_mask"][:] = 1.0
        for _ in range(runs + 3):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    by_op: dict[str, float] = {}
    runs_us: list[float] = []
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + float(e.get("dur", 0))
        elif e.get("cat") == "Session" and e.get("name") == "model_run":
            runs_us.append(float(e.get("dur", 0)))
    node_total = sum(by_op.values()) or 1.0
    run_total = sum(runs_us) or 1.0
    return {
        "op_share": {k: round(v / node_total, 4) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
        "node_time_fraction_of_run": round(node_total / run_total, 4),
        "run_ms_p50": float(np.median(runs_us[3:]) / 1e3) if len(runs_us) > 3 else None,
    }


def format_profile(p: dict[str, Any], top: int = 8) -> str:
    ops = list(p["op_share"].items())[:top]
    body = ", ".join(f"{k} {100 * v:.0f}%" for k, v in ops)
    return (
        f"student_step profile (onnxruntime, p50 {p['run_ms_p50']:.2f} ms per call; kernels are "
        f"{100 * p['node_time_fraction_of_run']:.0f}% of the call): {body}\n"
    )
