"""Export's CPU fusion (export/cpu_fusion.py): every GELU and attention of the student is rewritten, the rewritten
graph computes what the exported one does on both runtimes, and a pattern that differs is left alone."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from soundctm_rt.export.cpu_fusion import MS_DOMAIN, fuse_for_cpu


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _student_step_onnx(src, path):
    """The student step of a ModelSource exported as the pipeline exports it (dynamic batch), without fusion."""
    from soundctm_rt.export.onnx_io import export_onnx
    from soundctm_rt.export.wrappers import StudentStepExport

    cfg = src.config
    C, T, L, D = cfg.latent_channels, cfg.dit.latent_frames, cfg.text.max_length, src.text.hidden_size
    g = torch.Generator().manual_seed(0)
    args = (
        torch.randn(2, C, T, generator=g) * 5,
        torch.tensor([5.0, 5.0]),
        torch.tensor([0.5, 0.5]),
        torch.randn(2, L, D, generator=g),
        torch.ones(2, L),
        torch.randn(2, D, generator=g),
        torch.tensor([3.5, 3.5]),
    )
    names = ["x", "t", "s", "tokens", "token_mask", "pooled", "omega"]
    export_onnx(StudentStepExport(src.student), args, path, names, ["x_s"], dict.fromkeys(names, 0))
    return {n: a.numpy() for n, a in zip(names, args, strict=True)}


@pytest.fixture(scope="module")
def step_pair(tiny_source, tmp_path_factory):
    """(plain model, fused model, feeds with a masked prompt)."""
    path = tmp_path_factory.mktemp("fusion") / "student_step.onnx"
    feeds = _student_step_onnx(tiny_source, path)
    feeds["token_mask"][:, 5:] = 0.0  # the cross-attention bias matters
    plain = onnx.load(str(path))
    fused = onnx.load(str(path))
    counts = fuse_for_cpu(fused)
    return plain, fused, counts, feeds


def test_every_gelu_and_attention_is_fused(step_pair, tiny_source):
    plain, fused, counts, _ = step_pair
    depth = tiny_source.config.dit.depth
    assert counts == {"gelu": depth, "attention": 2 * depth}  # self- and cross-attention per block
    ops = _ops(fused)
    assert ops.count("FastGelu") == depth and ops.count("MultiHeadAttention") == 2 * depth
    assert "Tanh" not in ops and "Softmax" not in ops
    assert len(ops) < 0.8 * len(_ops(plain))  # the tiny model has relatively more embedding nodes
    assert any(o.domain == MS_DOMAIN for o in fused.opset_import)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_fused_graph_computes_the_same(step_pair, backend, tmp_path):
    from soundctm_rt.backends import BackendOptions, open_file_session

    plain, fused, _, feeds = step_pair
    outs = []
    for name, model in (("plain", plain), ("fused", fused)):
        onnx.save(model, str(tmp_path / f"{name}.onnx"))
        outs.append(open_file_session(tmp_path / f"{name}.onnx", BackendOptions(backend=backend)).run(feeds)[0])
    ref, got = outs
    np.testing.assert_allclose(got, ref, atol=1e-5 * float(np.abs(ref).max()))


def test_bundle_graphs_record_their_fusion(tiny_bundle, tiny_source):
    """Every student graph of the exported bundle was rewritten, the unrolled steps of a fused graph included
    (they share the text's keys and values)."""
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    depth = tiny_source.config.dit.depth
    assert m["graphs"]["student_step"]["attrs"]["cpu_fusion"] == {"gelu": depth, "attention": 2 * depth}
    for steps in m["fused_steps"]:
        fusion = m["graphs"][f"fused_{steps}"]["attrs"]["cpu_fusion"]
        assert fusion == {"gelu": steps * depth, "attention": 2 * steps * depth}
    assert "cpu_fusion" not in m["graphs"]["text_encoder"]["attrs"]


def _gelu_graph(c: float) -> onnx.ModelProto:
    """x @ W + b, then the tanh-GELU chain with cubic coefficient c."""
    k = float(np.sqrt(2 / np.pi))
    consts = {"W": np.eye(4, dtype=np.float32), "b": np.ones(4, np.float32)}
    consts |= {n: np.array(v, np.float32) for n, v in (("three", 3.0), ("c", c), ("k", k), ("one", 1.0))}
    consts["half"] = np.array(0.5, np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["h"]),
        helper.make_node("Pow", ["h", "three"], ["p"]),
        helper.make_node("Mul", ["c", "p"], ["m1"]),
        helper.make_node("Add", ["h", "m1"], ["a1"]),
        helper.make_node("Mul", ["k", "a1"], ["m2"]),
        helper.make_node("Tanh", ["m2"], ["th"]),
        helper.make_node("Add", ["th", "one"], ["a2"]),
        helper.make_node("Mul", ["half", "a2"], ["m3"]),
        helper.make_node("Mul", ["h", "m3"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "gelu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(v, n) for n, v in consts.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_gelu_takes_the_bias_and_matches(tmp_path):
    import onnxruntime as ort

    model = _gelu_graph(0.044715)
    x = np.linspace(-3, 3, 8, dtype=np.float32).reshape(2, 4)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert fuse_for_cpu(model)["gelu"] == 1
    assert _ops(model) == ["MatMul", "FastGelu"]
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_a_different_formula_is_left_alone():
    model = _gelu_graph(0.05)  # not GELU's coefficient
    before = _ops(model)
    assert fuse_for_cpu(model) == {"gelu": 0, "attention": 0}
    assert _ops(model) == before
