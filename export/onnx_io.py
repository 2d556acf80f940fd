"""torch -> ONNX, with the weights of all graphs deduplicated into one shared external-data file.

The fused graphs repeat the student (and decoder) weights; without sharing, a bundle would hold them once per
step count. Every initializer above a small size is stored once in `weights.bin` (by content hash), and each
graph's initializers point into it by offset. onnxruntime and OpenVINO both resolve external data relative to
the model file.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

log = logging.getLogger(__name__)

OPSET = 18
SHARE_MIN_BYTES = 1024  # smaller tensors stay inside the graph
ALIGN = 4096  # page alignment lets onnxruntime map the data
MAX_BATCH = 64  # the largest batch a graph with a dynamic batch dimension is exported for
LENGTH_DIM = "length"  # the text encoder's dynamic token length (left dynamic at run time: Engine.encode_prompt)


def export_onnx(
    module: torch.nn.Module,
    args: tuple,
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_batch: list[str] | dict[str, int] | None = None,
    dynamic_length: dict[str, int] | None = None,
    max_length: int = 0,
) -> onnx.ModelProto:
    """Export one wrapper with the dynamo exporter.

    `dynamic_batch` names the inputs with a batch dimension, the dynamic dim "batch": a list (dim 0) or
    {input: axis}. `dynamic_length` ({input: axis}) gives those inputs a dynamic token-length dim "length" in
    [2, max_length] (the text encoder: the runtime runs a short prompt at a shorter length). The runtime pins the
    batch per session (static shapes for the optimisers, backends.py) and leaves the length dynamic.
    """
    module.eval()
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    dynamic_shapes: Any = None
    if dynamic_batch:
        axes = dynamic_batch if isinstance(dynamic_batch, dict) else dict.fromkeys(dynamic_batch, 0)
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        dynamic_shapes = {n: ({axes[n]: batch} if n in axes else None) for n in input_names}
    if dynamic_length:
        if max_length < 2:
            raise ValueError("export_onnx: dynamic_length needs max_length >= 2")
        length = torch.export.Dim(LENGTH_DIM, min=2, max=max_length)
        dynamic_shapes = dynamic_shapes or dict.fromkeys(input_names)
        for n, ax in dynamic_length.items():
            dynamic_shapes[n] = {**(dynamic_shapes[n] or {}), ax: length}
    import inspect

    params = list(inspect.signature(module.forward).parameters)
    if dynamic_shapes is not None:
        dynamic_shapes = {p: dynamic_shapes[n] for p, n in zip(params, input_names, strict=True)}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=OPSET,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            optimize=True,
            verbose=False,
        )
    if prog is None:  # only the legacy (dynamo=False) exporter returns nothing
        raise RuntimeError(f"torch.onnx.export returned no program for {path.name}")
    model = prog.model_proto
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return model


class SharedWeights:
    """Appends unique tensors to one external-data file and rewrites initializers to point into it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.index: dict[str, tuple[int, int]] = {}
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "wb")

    def add(self, raw: bytes) -> tuple[int, int]:
        key = hashlib.sha256(raw).hexdigest()
        if key not in self.index:
            off = self.f.tell()
            pad = (-off) % ALIGN
            if pad:
                self.f.write(b"\0" * pad)
                off += pad
            self.f.write(raw)
            self.index[key] = (off, len(raw))
        return self.index[key]

    def externalize(self, model_path: Path, fp16: bool = False) -> int:
        """Move the big initializers of the model at model_path into the shared file (rewrites the model).

        With `fp16`, float32 initializers that float16 represents exactly are stored as float16 behind a Cast
        to float32 (returns how many): storage halves, the computation stays float32 and bit-identical,
        because both runtimes fold the Cast of a constant at load time. Export rounds the weights to float16
        first (pipeline.round_to_fp16), so every weight qualifies; computed constants that do not stay float32.
        """
        model = onnx.load(str(model_path), load_external_data=True)
        strip_debug_info(model)
        fold_constant_transposes(model)
        halved = _store_fp16(model) if fp16 else 0
        for init in model.graph.initializer:
            arr = numpy_helper.to_array(init)
            raw = arr.tobytes()
            if len(raw) < SHARE_MIN_BYTES:
                continue
            off, n = self.add(raw)
            name, dims, dtype = init.name, list(init.dims), init.data_type
            init.Clear()
            init.name, init.data_type = name, dtype
            init.dims.extend(dims)
            init.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", self.path.name), ("offset", str(off)), ("length", str(n))):
                e = init.external_data.add()
                e.key, e.value = k, v
        onnx.save_model(model, str(model_path))
        return halved

    def close(self) -> None:
        self.f.close()


def strip_debug_info(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node metadata (stack traces with local paths, module scopes), in place.

    It is ~85% of a graph file's bytes (1.10 of fused_1's 1.33 MB for the cpu config) and names files on
    the exporting machine; nothing reads it at run time.
    """

    def strip(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    strip(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        strip(g)

    strip(model.graph)


def _store_fp16(model: onnx.ModelProto) -> int:
    """Turn exactly-representable float32 initializers into float16 ones feeding a Cast, in place.

    The initializer keeps its name (bench maps torch parameters to initializer names); its consumers read the
    Cast's output `<name>__f32` instead.
    """
    graph_outputs = {o.name for o in model.graph.output}
    casts = []
    for init in model.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or init.name in graph_outputs:
            continue
        arr = numpy_helper.to_array(init)
        if arr.nbytes < SHARE_MIN_BYTES:
            continue
        half = arr.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), arr, equal_nan=True):
            continue
        init.CopyFrom(numpy_helper.from_array(half, init.name))
        casts.append(init.name)
    renamed = {n: f"{n}__f32" for n in casts}
    _rename_inputs(model.graph, renamed)
    new_nodes = [
        onnx.helper.make_node("Cast", [n], [renamed[n]], name=f"{n}__cast", to=onnx.TensorProto.FLOAT) for n in casts
    ]
    for i, node in enumerate(new_nodes):
        model.graph.node.insert(i, node)
    return len(casts)


def _rename_inputs(graph: onnx.GraphProto, renamed: dict[str, str]) -> None:
    """Point node inputs at new names, also inside subgraphs (If/Loop bodies read outer initializers)."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _rename_inputs(attr.g, renamed)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _rename_inputs(g, renamed)


def fold_constant_transposes(model: onnx.ModelProto) -> int:
    """Replace Transpose(initializer) nodes by a transposed initializer, in place; returns how many.

    The exporter's optimiser folds these in some graphs and not in others (a weight used by several unrolled
    steps keeps its Transpose), so the same weight would be stored in two layouts. Folding them all makes
    every graph hold the layout the MatMul consumes, and the shared weights file deduplicates them.
    """
    inits = {i.name: i for i in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    folded = []
    for node in model.graph.node:
        if node.op_type != "Transpose" or node.input[0] not in inits:
            continue
        arr = numpy_helper.to_array(inits[node.input[0]])
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), list(range(arr.ndim))[::-1])
        model.graph.initializer.append(
            numpy_helper.from_array(np.ascontiguousarray(arr.transpose(perm)), node.output[0])
        )
        folded.append(node)
        uses[node.input[0]] -= 1
    for node in folded:
        model.graph.node.remove(node)
    graph_outputs = {o.name for o in model.graph.output}
    for name, init in list(inits.items()):
        if uses.get(name, 0) == 0 and name not in graph_outputs:
            model.graph.initializer.remove(init)
    return len(folded)


def io_contract(model: onnx.ModelProto) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Input/output names, shapes (int or dim name) and dtypes of a model, for the manifest."""

    def describe(vi: onnx.ValueInfoProto) -> dict[str, Any]:
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        return {
            "name": vi.name,
            "shape": shape,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name,
        }

    inits = {i.name for i in model.graph.initializer}
    return [describe(v) for v in model.graph.input if v.name not in inits], [describe(v) for v in model.graph.output]
