"""Inference sessions on onnxruntime or OpenVINO behind one small interface: run(feeds) -> outputs.

Settings follow DESIGN.md: onnxruntime with explicit intra-op threads, inter-op 1, sequential execution, all
graph optimisations and spinning off (always: several sessions share the cores, see OrtSession); OpenVINO
with the LATENCY hint, f32 precision pinned
(it silently picks bf16 on CPUs that have it), a thread count and a compiled-model cache.

Static shapes: a session opened for a `batch` pins the graphs' dynamic "batch" dimension (onnxruntime's free
dimension override, OpenVINO's reshape before compiling), so both optimisers see every shape. Measured on the
cpu architecture's student step, 1 thread, CPU time: OpenVINO 17.5 -> 15.4 ms, onnxruntime within 2 %.
The text encoder's token length stays dynamic (one session for every prompt length): measured on
all-MiniLM-L6-v2 at 16 tokens, 2 threads, idle, a dynamic-length session is as fast as one pinned to 16
(onnxruntime 5.06 vs 5.03 ms, OpenVINO 2.95 vs 2.4-2.8 ms).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .bundle import BACKENDS, Bundle, BundleError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendOptions:
    backend: str = "onnxruntime"  # "onnxruntime" | "openvino"
    device: str = "cpu"  # "cpu" | "gpu" | "npu" where the backend has it
    threads: int | None = None  # None: all cores, or cores - 1 when audio runs
    audio_active: bool = False  # a real-time audio callback shares the machine: no spinning, leave a core
    cache_dir: str | None = None  # OpenVINO compiled-model cache
    allow_spinning: bool = False  # onnxruntime intra-op spin-waiting (off: see OrtSession)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {self.backend!r}")
        if self.device not in ("cpu", "gpu", "npu"):
            raise ValueError(f"device must be cpu, gpu or npu, not {self.device!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be >= 1")

    def resolved_threads(self) -> int:
        if self.threads:
            return self.threads
        n = os.cpu_count() or 1
        return max(1, n - 1) if self.audio_active else n


class Session(Protocol):
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


BATCH_DIM = "batch"  # the name export gives every dynamic batch dimension


class OrtSession:
    def __init__(self, path: Path, opts: BackendOptions, batch: int | None = None) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        if batch is not None:
            so.add_free_dimension_override_by_name(BATCH_DIM, batch)
        so.intra_op_num_threads = opts.resolved_threads()
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        # No spinning, ever: an Engine holds several sessions (text, student, decoders), each with its own intra-op
        # pool, and a pool that spins after its call steals the cores of the next session's pool. Measured on 2
        # cores, cpu config, 2-step host path: student step p50 21.5 ms spinning vs 9.1 ms not; whole generation
        # 81 vs 34 ms. With audio playing it also keeps a core free for the callback.
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if opts.allow_spinning else "0")
        providers = ["CPUExecutionProvider"]
        if opts.device == "gpu":
            avail = ort.get_available_providers()
            gpu = [p for p in ("CUDAExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider") if p in avail]
            if not gpu:
                raise BundleError(f"onnxruntime has no GPU provider here (available: {avail}); use --device cpu")
            providers = [gpu[0], *providers]
        elif opts.device == "npu":
            raise BundleError("onnxruntime has no NPU device here; use --backend openvino --device npu")
        try:
            self.sess = ort.InferenceSession(str(path), so, providers=providers)
        except Exception as e:
            raise BundleError(f"onnxruntime could not load {path.name}: {e}") from e
        self.input_names = [i.name for i in self.sess.get_inputs()]
        self.output_names = [o.name for o in self.sess.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sess.run(None, feeds)


class OpenVINOSession:
    def __init__(self, xml: Path, weights: Path | None, opts: BackendOptions, batch: int | None = None) -> None:
        try:
            import openvino as ov
        except ImportError as e:
            raise BundleError("the openvino backend needs OpenVINO: pip install 'soundctm-rt[openvino]'") from e
        self.core = ov.Core()  # kept alive as long as the compiled model: OpenVINO needs its Core
        device = {"cpu": "CPU", "gpu": "GPU", "npu": "NPU"}[opts.device]
        if device not in self.core.available_devices:
            raise BundleError(f"OpenVINO has no {device} here (available: {self.core.available_devices})")
        config = {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32",
            "INFERENCE_NUM_THREADS": opts.resolved_threads(),
        }
        if device != "CPU":
            config = {"PERFORMANCE_HINT": "LATENCY"}
        if opts.cache_dir:
            config["CACHE_DIR"] = opts.cache_dir
        try:
            model = self.core.read_model(str(xml), str(weights)) if weights else self.core.read_model(str(xml))
            if batch is not None:
                pin_batch(ov, model, batch)
            self.compiled = self.core.compile_model(model, device, config)
        except Exception as e:
            raise BundleError(f"OpenVINO could not load {xml.name}: {e}") from e
        self.request = self.compiled.create_infer_request()
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()})
        return [np.array(self.request.get_output_tensor(i).data) for i in range(len(self.output_names))]


def pin_batch(ov: Any, model: Any, batch: int) -> None:
    """Set the first dynamic dimension of each of the model's inputs (its batch) to `batch`.

    Export leaves only batch dims dynamic, and in the text encoder the token length after the batch, which stays
    dynamic: a short prompt runs at a short length (Engine.encode_prompt). OpenVINO's ONNX frontend does not keep
    the dims' names, so they are told apart by position.
    """
    shapes = {}
    for port in model.inputs:
        ps = port.get_partial_shape()
        if ps.is_dynamic:
            first = next(i for i, d in enumerate(ps) if d.is_dynamic)
            dims = [batch if i == first else (d if d.is_dynamic else d.get_length()) for i, d in enumerate(ps)]
            shapes[port] = ov.PartialShape(dims)
    if shapes:
        model.reshape(shapes)


def open_session(bundle: Bundle, graph: str, opts: BackendOptions, batch: int | None = None) -> Session:
    """A session for one graph of a bundle on the chosen backend; `batch` pins its batch dimension."""
    spec = bundle.graph(graph)
    if opts.backend not in spec.files:
        raise BundleError(f"graph '{graph}' of bundle {bundle.root} has no {opts.backend} file")
    path = bundle.path(spec.files[opts.backend])
    if opts.backend == "onnxruntime":
        return OrtSession(path, opts, batch)
    w = spec.weights.get("openvino")
    return OpenVINOSession(path, bundle.path(w) if w else None, opts, batch)


def open_file_session(
    path: Path, opts: BackendOptions, weights: Path | None = None, batch: int | None = None
) -> Session:
    """A session straight from a graph file (export's parity gate, before a manifest exists)."""
    if opts.backend == "onnxruntime":
        return OrtSession(path, opts, batch)
    return OpenVINOSession(path, weights, opts, batch)


def cpu_features() -> dict[str, Any]:
    """The CPU's model and the instruction-set extensions INT8 and float32 inference depend on (Linux; {} else)."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return {}
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), None)
    flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))
    return {
        "model": model,
        "avx2": "avx2" in flags,
        "fma": "fma" in flags,
        "avx512f": "avx512f" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "avx_vnni": "avx_vnni" in flags,
        "vnni": bool(flags & {"avx512_vnni", "avx_vnni"}),
        "amx_int8": "amx_int8" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
    }
