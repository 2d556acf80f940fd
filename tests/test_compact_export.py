"""The compact bundle (float16 weights, INT8 word embeddings, OpenVINO on the ONNX files): the shipped format."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper


@pytest.fixture(scope="module")
def compact_bundle(tmp_path_factory, tiny_source):
    from soundctm_rt.export.pipeline import COMPACT, ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("compact") / "tiny"
    return export_bundle(tiny_source, out, ExportOptions(steps=(1, 2), **COMPACT))


def test_compact_bundle_stores_half_and_int8(compact_bundle, tiny_bundle):
    m = json.loads((compact_bundle / "manifest.json").read_text())
    assert m["compression"]["weights"] == "fp16" and m["compression"]["int8_embeddings"]
    assert m["compression"]["text_encoder_vs_fp32"]["pooled_cosine_min"] >= 0.99
    # one set of files: OpenVINO compiles the ONNX graphs, no IR copy of the weights
    assert not (compact_bundle / "openvino").exists()
    for g in m["graphs"].values():
        assert g["files"]["openvino"] == g["files"]["onnxruntime"]
    te = onnx.load(str(compact_bundle / "onnx" / "text_encoder.onnx"), load_external_data=True)
    dtypes = {i.name: i.data_type for i in te.graph.initializer}
    assert dtypes["text.bert.embeddings.word_embeddings.weight"] == onnx.TensorProto.INT8
    assert onnx.TensorProto.FLOAT16 in dtypes.values()
    full = (tiny_bundle / "onnx" / "weights.bin").stat().st_size
    assert (compact_bundle / "onnx" / "weights.bin").stat().st_size < 0.6 * full


def test_compact_parity_is_exact_against_the_rounded_model(compact_bundle):
    """Rounding happens in torch before export, so the gate still compares the same weights (>100 dB)."""
    m = json.loads((compact_bundle / "manifest.json").read_text())
    for graph, per_backend in m["parity"]["graphs"].items():
        for backend, outs in per_backend.items():
            for name, r in outs.items():
                assert r["snr_db"] == "inf" or r["snr_db"] > 100, (graph, backend, name, r)


def test_compact_export_leaves_the_caller_model_alone(tiny_source, compact_bundle):
    w = tiny_source.student.net.parameters().__next__().detach().numpy()
    assert not np.array_equal(w.astype(np.float16).astype(np.float32), w)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_compact_bundle_generates_on_both_backends(compact_bundle, backend):
    from soundctm_rt.engine import Engine

    eng = Engine(compact_bundle, backend=backend)
    audio, _ = eng.generate("Roland TR-808 kick drum", seed=3, steps=2)
    assert audio.dtype == np.float32 and np.all(np.isfinite(audio)) and np.abs(audio).max() > 0
    host, _ = eng.generate("Roland TR-808 kick drum", seed=3, steps=2, fused=False)
    np.testing.assert_allclose(host, audio, atol=1e-4)


def test_store_fp16_keeps_values_float16_cannot_hold():
    from soundctm_rt.export.onnx_io import _store_fp16

    exact = np.arange(512, dtype=np.float32) / 8  # representable
    inexact = exact + np.float32(1e-5)
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Add", ["x", "a"], ["y"]),
            onnx.helper.make_node("Add", ["y", "b"], ["z"]),
        ],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [512])],
        [onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [512])],
        [numpy_helper.from_array(exact, "a"), numpy_helper.from_array(inexact, "b")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    assert _store_fp16(model) == 1
    onnx.checker.check_model(model)
    import onnxruntime as ort

    x = np.ones(512, np.float32)
    (z,) = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    np.testing.assert_array_equal(z, x + exact + inexact)


def test_int8_gather_refuses_a_table_off_its_grid(tmp_path, tiny_source):
    import copy

    import torch

    from soundctm_rt.export.compact import int8_word_embedding_gather, quantise_word_embeddings, word_embedding
    from soundctm_rt.export.onnx_io import export_onnx
    from soundctm_rt.export.wrappers import TextEncoderExport

    text = copy.deepcopy(tiny_source.text)
    ids = torch.tensor([[101, 2023, 102] + [0] * (tiny_source.config.text.max_length - 3)])
    path = tmp_path / "te.onnx"
    export_onnx(TextEncoderExport(text), (ids, (ids > 0).long()), path, ["input_ids", "attention_mask"], ["t", "p"])
    table = word_embedding(text).weight.detach().numpy()
    with pytest.raises(ValueError, match="not on its INT8 grid"):
        int8_word_embedding_gather(path, table, 0.001)
    with pytest.raises(ValueError, match="found 0"):
        int8_word_embedding_gather(path, table[:-1], 0.001)
    scale = quantise_word_embeddings(text)
    export_onnx(TextEncoderExport(text), (ids, (ids > 0).long()), path, ["input_ids", "attention_mask"], ["t", "p"])
    assert int8_word_embedding_gather(path, word_embedding(text).weight.detach().numpy(), scale)


@pytest.mark.slow
def test_text_quality_gate_refuses(tiny_source, tmp_path, monkeypatch):
    from soundctm_rt.export import pipeline
    from soundctm_rt.export.parity import ParityError

    monkeypatch.setattr(pipeline, "MIN_POOLED_COSINE", 1.01)
    opts = pipeline.ExportOptions(steps=(1,), openvino=False, int8_embeddings=True)
    with pytest.raises(ParityError, match="pooled cosine"):
        pipeline.export_bundle(tiny_source, tmp_path / "b", opts)


def test_export_cli_compact_and_bad_options(tmp_path):
    from typer.testing import CliRunner

    from soundctm_rt.cli import app

    r = CliRunner().invoke(
        app, ["export", "--init", "random", "--config", "tiny", "-o", str(tmp_path / "b"), "--weights", "fp8"]
    )
    assert r.exit_code != 0 and "fp32 or fp16" in r.output


def test_bench_rebuilds_the_torch_student_from_float16_storage(compact_bundle):
    """bench's torch-eager comparison reads the student's weights back out of the compact ONNX files."""
    import torch

    from soundctm_rt.backends import BackendOptions, open_session
    from soundctm_rt.bench.torch_student import load_student_from_bundle
    from soundctm_rt.bundle import Bundle

    b = Bundle.open(compact_bundle)
    module, feeds = load_student_from_bundle(b)
    with torch.no_grad():
        ref = module(*feeds).numpy()
    names = b.graph("student_step").input_names()
    (got,) = open_session(b, "student_step", BackendOptions()).run(
        {n: f.numpy() for n, f in zip(names, feeds, strict=True)}
    )
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_default_steps_must_be_a_fused_graph():
    from soundctm_rt.export.pipeline import ExportOptions

    assert ExportOptions(steps=(1, 4), default_steps=4).default_steps == 4
    with pytest.raises(ValueError, match="one of the fused steps"):
        ExportOptions(steps=(1, 2), default_steps=4)
