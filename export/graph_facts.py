"""Facts about an exported graph that the bench needs: its FLOPs per call, and where each torch parameter of
the student landed in the ONNX graph (so `bench` can run the same weights in torch eager)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper, shape_inference


def count_flops(model_path: Path, batch: int = 1) -> int:
    """2·MACs of MatMul/Gemm/Conv/ConvTranspose nodes, with dynamic dims set to `batch`."""
    model = onnx.load(str(model_path), load_external_data=False)
    for vi in model.graph.input:
        for d in vi.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.dim_value = batch
    model = shape_inference.infer_shapes(model, data_prop=True)
    shapes: dict[str, list[int]] = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    macs = 0
    for node in model.graph.node:
        out = shapes.get(node.output[0]) if node.output else None
        if not out or any(d < 0 for d in out):
            continue
        if node.op_type == "MatMul":
            a = shapes.get(node.input[0])
            if a and a[-1] > 0:
                macs += int(np.prod(out)) * a[-1]
        elif node.op_type == "Gemm":
            a = shapes.get(node.input[0])
            trans_a = any(at.name == "transA" and at.i for at in node.attribute)
            if a:
                macs += int(np.prod(out)) * (a[0] if trans_a else a[-1])
        elif node.op_type == "Conv":
            w = shapes.get(node.input[1])
            if w:
                macs += int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type == "ConvTranspose":
            x, w = shapes.get(node.input[0]), shapes.get(node.input[1])
            if x and w and all(d > 0 for d in x):
                macs += int(np.prod(x)) * int(np.prod(w[1:]))
    return 2 * macs


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def torch_param_map(module: torch.nn.Module, model_path: Path) -> dict[str, Any]:
    """{state_dict key: [initializer name, transposed?]} by content; keys not found are listed as missing."""
    model = onnx.load(str(model_path), load_external_data=True)
    table = {_digest(numpy_helper.to_array(i)): i.name for i in model.graph.initializer}
    found: dict[str, list[Any]] = {}
    missing = []
    for k, v in module.state_dict().items():
        a = v.detach().float().numpy()
        if (name := table.get(_digest(a))) is not None:
            found[k] = [name, False]
        elif a.ndim == 2 and (name := table.get(_digest(a.T))) is not None:
            found[k] = [name, True]
        else:
            missing.append(k)
    return {"params": found, "missing": missing}
