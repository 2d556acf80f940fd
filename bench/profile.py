"""Where a student step's time goes, per operator type, on each backend.

onnxruntime: its per-node profile (session option `enable_profiling`); OpenVINO: its performance counters
(`PERF_COUNT`). Both sessions are opened as the Engine opens them (the bundle's graph, batch pinned to 1).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..backends import BackendOptions
from ..bundle import Bundle


def _feeds(inputs: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for i in inputs:
        shape = [d if isinstance(d, int) else 1 for d in i["shape"]]
        feeds[i["name"]] = rng.standard_normal(shape).astype(np.float32)
    feeds["t"][:] = 10.0
    feeds["s"][:] = 1.0
    feeds["token_mask"][:] = 1.0
    return feeds


def profile_student_step(
    bundle: Bundle, runs: int = 20, threads: int | None = None, backend: str = "onnxruntime"
) -> dict[str, Any]:
    """Run student_step `runs` times with profiling on; {op_type: share of node time} and the totals."""
    spec = bundle.graph("student_step")
    feeds = _feeds(spec.inputs)
    if backend == "openvino":
        return _profile_openvino(bundle, feeds, runs, threads)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or os.cpu_count() or 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_free_dimension_override_by_name("batch", 1)
    so.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        so.profile_file_prefix = str(Path(tmp) / "student_step")
        sess = ort.InferenceSession(str(bundle.path(spec.files["onnxruntime"])), so, providers=["CPUExecutionProvider"])
        for _ in range(runs + 3):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    by_op: dict[str, float] = {}
    nodes: dict[str, int] = {}
    runs_us: list[float] = []
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + float(e.get("dur", 0))
            nodes[op] = nodes.get(op, 0) + 1
        elif e.get("cat") == "Session" and e.get("name") == "model_run":
            runs_us.append(float(e.get("dur", 0)))
    calls = max(1, len(runs_us))
    return _summary("onnxruntime", by_op, {k: v // calls for k, v in nodes.items()}, runs_us[3:], sum(runs_us))


def _profile_openvino(bundle: Bundle, feeds: dict[str, np.ndarray], runs: int, threads: int | None) -> dict[str, Any]:
    import time

    import openvino as ov

    spec = bundle.graph("student_step")
    if "openvino" not in spec.files:
        raise ValueError("the bundle has no OpenVINO file for student_step")
    core = ov.Core()
    w = spec.weights.get("openvino")
    path = str(bundle.path(spec.files["openvino"]))
    model = core.read_model(path, str(bundle.path(w))) if w else core.read_model(path)
    from ..backends import pin_batch

    pin_batch(ov, model, 1)
    opts = BackendOptions(backend="openvino", threads=threads)
    config = {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32",
        "INFERENCE_NUM_THREADS": opts.resolved_threads(),
        "PERF_COUNT": True,
    }
    compiled = core.compile_model(model, "CPU", config)
    req = compiled.create_infer_request()
    by_op: dict[str, float] = {}
    nodes: dict[str, int] = {}
    runs_us: list[float] = []
    for i in range(runs + 3):
        t0 = time.perf_counter()
        req.infer(feeds)
        dt = 1e6 * (time.perf_counter() - t0)
        if i < 3:
            continue
        runs_us.append(dt)
        for p in req.profiling_info:
            if p.status != p.Status.EXECUTED:
                continue
            us = p.real_time.total_seconds() * 1e6
            by_op[p.node_type] = by_op.get(p.node_type, 0.0) + us
            if i == 3:
                nodes[p.node_type] = nodes.get(p.node_type, 0) + 1
    return _summary("openvino", by_op, nodes, runs_us, sum(runs_us))


def _summary(
    backend: str, by_op: dict[str, float], nodes: dict[str, int], runs_us: list[float], total_us: float
) -> dict[str, Any]:
    node_total = sum(by_op.values()) or 1.0
    return {
        "backend": backend,
        "op_share": {k: round(v / node_total, 4) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
        "nodes_per_call": dict(sorted(nodes.items(), key=lambda kv: -kv[1])),
        "node_time_fraction_of_run": round(node_total / (total_us or 1.0), 4),
        "run_ms_p50": float(np.median(runs_us) / 1e3) if runs_us else None,
    }


def format_profile(p: dict[str, Any], top: int = 8) -> str:
    ops = list(p["op_share"].items())[:top]
    body = ", ".join(f"{k} {100 * v:.0f}%" for k, v in ops)
    return (
        f"student_step profile ({p.get('backend', 'onnxruntime')}, p50 {p['run_ms_p50']:.2f} ms per call, "
        f"{sum(p.get('nodes_per_call', {}).values())} nodes; kernels are "
        f"{100 * p['node_time_fraction_of_run']:.0f}% of the call): {body}\n"
    )
