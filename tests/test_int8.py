"""INT8 variants (export/int8.py): written per backend beside the float graphs, never the default, with their
measured cost and speed in the manifest; the Engine runs them only when asked."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_distill_run import distill_dataset  # noqa: F401 - module fixture

from soundctm_rt.bundle import Bundle, BundleError
from soundctm_rt.engine import Engine

GRAPHS = {"student_step", "fused_1", "fused_2"}  # the student only


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory):
    """The tiny mel-latent model in the shipped (compact) storage, with INT8 variants."""
    from soundctm_rt.export.pipeline import COMPACT, ExportOptions, export_bundle
    from soundctm_rt.train.checkpoint import init_random
    from soundctm_rt.train.models.config import load_model_config

    out = tmp_path_factory.mktemp("int8") / "tiny-mel"
    src = init_random(load_model_config("tiny-mel"), seed=0)
    return export_bundle(src, out, ExportOptions(steps=(1, 2), int8=True, **COMPACT))


def test_manifest_records_variants_quality_and_speed(int8_bundle):
    m = json.loads((int8_bundle / "manifest.json").read_text())
    assert set(m["int8"]) == GRAPHS
    for name, v in m["int8"].items():
        assert set(v["files"]) == {"onnxruntime", "openvino"} and v["file"] == v["files"]["onnxruntime"]
        assert v["weights"] == {"onnxruntime": "onnx/weights.int8.bin", "openvino": "onnx/weights.int8-ov.bin"}
        for backend in ("onnxruntime", "openvino"):
            snr = [x for k, x in v["quality"]["by_backend"][backend].items() if k.endswith("_snr_db")]
            assert snr and min(snr) > 20.0, (name, backend, v["quality"])
            assert v["speed"][backend]["fp32_ms"] > 0 and v["speed"][backend]["speedup"] > 0
        assert m["graphs"][name]["files"]["onnxruntime"] != v["file"]  # a separate file, never the default
    rep = m["int8_report"]
    assert {"avx2", "vnni", "avx512f", "amx_int8"} <= set(rep["cpu"])
    for backend in ("onnxruntime", "openvino"):
        takes = rep["takes_vs_fp32"]["backends"][backend]
        assert takes["latent_snr_db_median"] > 15.0
        assert set(takes["takes"]) == {"fused_1", "fused_2"}
        assert all(0 <= t["log_mel_l1_db_mean"] < 6.0 for t in takes["takes"].values())
    # the shared INT8 weights are stored once for all graphs (the fused graphs repeat the student's weights)
    step = (int8_bundle / "onnx" / "weights.int8.bin").stat().st_size
    assert step < 2.5 * (int8_bundle / "onnx" / "weights.bin").stat().st_size


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_engine_runs_int8_only_when_asked(int8_bundle, backend):
    fp = Engine(int8_bundle, backend=backend, warmup=False)
    q = Engine(int8_bundle, backend=backend, warmup=False, int8=True)
    for steps, fused in ((1, None), (2, None), (2, False)):
        a, _ = fp.generate("a dog barking", seed=2, steps=steps, fused=fused)
        b, _ = q.generate("a dog barking", seed=2, steps=steps, fused=fused)
        assert np.all(np.isfinite(b)) and not np.array_equal(a, b)
    single, _ = q.generate("a dog barking", seed=3, steps=1)
    takes = list(q.generate_variations("a dog barking", 3, seed=2, steps=1))  # INT8 on onnxruntime: batch 1
    np.testing.assert_allclose(takes[1].audio, single, atol=1e-4 * float(np.abs(single).max()))
    batched = list(q.generate_variations("a dog barking", 3, seed=2, steps=1, batch=3))
    assert {t.timing.batch for t in batched} == {3}
    if backend == "onnxruntime":  # one activation scale for the batch: close to the single take, not equal
        from soundctm_rt.export.int8 import log_mel_distance_db

        assert log_mel_distance_db(batched[1].audio, single, q.sample_rate) < 3.0
    else:  # weight-only INT8, float activations: the batch changes nothing
        np.testing.assert_allclose(batched[1].audio, single, atol=1e-4 * float(np.abs(single).max()))


def test_old_manifests_with_one_onnxruntime_file_still_load(int8_bundle, tmp_path):
    """Bundles made before per-backend variants name `file` only: read as an onnxruntime variant."""
    b = Bundle.open(int8_bundle)
    m = copy.deepcopy(b.manifest)
    for v in m["int8"].values():
        for k in ("files", "weights", "speed", "method"):
            v.pop(k)
    m["int8"]["student_step"]["weights"] = {"onnxruntime": "onnx/weights.int8.bin"}
    dst = tmp_path / "old"
    shutil.copytree(int8_bundle, dst)
    (dst / "manifest.json").write_text(json.dumps(m))
    old = Bundle.open(dst)
    assert old.spec.int8["student_step"].files == {"onnxruntime": "onnx/student_step.int8.onnx"}
    a, _ = Engine(old, int8=True, warmup=False).generate("rain", seed=1, steps=1)
    assert np.all(np.isfinite(a))
    with pytest.raises(BundleError, match="no INT8 variants for openvino"):
        Engine(old, backend="openvino", int8=True, warmup=False)


def test_weight_only_compression_keeps_each_weight_once():
    import onnxruntime as ort

    from soundctm_rt.export.int8 import compress_weights

    rng = np.random.default_rng(0)
    w = rng.standard_normal((128, 64)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x1", "W"], ["y1"]), helper.make_node("MatMul", ["x2", "W"], ["y2"])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4, 128]) for n in ("x1", "x2")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4, 64]) for n in ("y1", "y2")],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    feeds = {n: rng.standard_normal((4, 128)).astype(np.float32) for n in ("x1", "x2")}

    def run(m: onnx.ModelProto) -> list[np.ndarray]:
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)

    ref = run(model)
    assert compress_weights(model) == 1  # one weight, used twice, compressed once
    assert [n.op_type for n in model.graph.node].count("DequantizeLinear") == 1
    dtypes = {i.name: i.data_type for i in model.graph.initializer}
    assert dtypes["W__int8"] == TensorProto.INT8 and "W" not in dtypes
    for r, g in zip(ref, run(model), strict=True):
        assert np.abs(g - r).max() < 0.02 * np.abs(r).max()  # per-channel int8: ~0.4 % of each column's range


def test_int8_quality_in_the_evaluation_embedding(int8_bundle, distill_dataset, tmp_path):  # noqa: F811
    """`bench int8-quality` scores float32 and INT8 takes of the same prompts and seeds like `eval` scores a
    student, and records the result in the bundle (log-mel embedding here; BirdNET by default)."""
    import subprocess
    import sys

    b = tmp_path / "b"
    shutil.copytree(int8_bundle, b)
    out = tmp_path / "q.json"
    args = ["bench", "int8-quality", "--data", str(distill_dataset), "--bundle", str(b), "--embedding", "logmel"]
    args += ["--prompts", "4", "--seeds", "0", "--steps", "1", "--json", str(out), "--write-manifest"]
    r = subprocess.run([sys.executable, "-m", "soundctm_rt", *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    for name in ("fp32", "int8"):
        assert res[name]["fd"]["mean"] >= 0 and 0 <= res[name]["adherence"]["mean"] <= 1
    assert set(res["difference"]) == {"fd_relative", "kid", "adherence"}
    assert "int8 - fp32: FD" in r.stdout
    recorded = Bundle.open(b).manifest["int8_report"]["embedding_metrics"]["onnxruntime"]
    assert recorded["fp32"]["fd"] == res["fp32"]["fd"]


def test_weights_meeting_a_constant_input_stay_float():
    """A weight whose product with a constant the runtimes fold at load (a fused graph's time embedding) is not
    compressed: OpenVINO's constant folding cannot run through the DequantizeLinear."""
    from soundctm_rt.export.int8 import compress_weights

    w = np.ones((64, 64), np.float32)
    nodes = [helper.make_node("MatMul", ["c", "W"], ["a"]), helper.make_node("MatMul", ["x", "W"], ["b"])]
    nodes += [helper.make_node("MatMul", ["x", "V"], ["y"]), helper.make_node("Add", ["a", "b"], ["z"])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 64]) for n in ("y", "z")],
        [numpy_helper.from_array(a, n) for n, a in (("W", w), ("V", 2 * w), ("c", w[:1]))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert compress_weights(model) == 1
    dtypes = {i.name: i.data_type for i in model.graph.initializer}
    assert dtypes["W"] == TensorProto.FLOAT and dtypes["V__int8"] == TensorProto.INT8


def test_a_fused_decoder_stays_float(tiny_bundle):
    """In a VAE bundle's fused graph, the nodes after the latent (the decoder) are not quantised."""
    from soundctm_rt.export.int8 import decoder_nodes

    model = onnx.load(str(tiny_bundle / "onnx" / "fused_1.onnx"), load_external_data=False)
    names = decoder_nodes(model)
    ops = {n.name: n.op_type for n in model.graph.node}
    assert names and "Conv" in {ops[n] for n in names}
    assert not [n for n in model.graph.node if n.op_type == "MultiHeadAttention" and n.name in names]
    step = onnx.load(str(tiny_bundle / "onnx" / "student_step.onnx"), load_external_data=False)
    assert decoder_nodes(step) == set()


def test_bench_times_int8_against_float32(int8_bundle, tmp_path):
    """`soundctm-rt bench --int8 B`: per backend, float32 and INT8 of one bundle in the same run, with the CPU's
    features; the step ratio is read from the host path and the take's from the fused one."""
    import subprocess
    import sys

    out = tmp_path / "b.json"
    args = ["--bundle", str(int8_bundle), "--steps", "1", "--runs", "2", "--warmup", "1", "--no-torch"]
    args += ["--variations", "", "--cold-runs", "0", "--int8", str(int8_bundle), "--int8-steps", "1,2"]
    r = subprocess.run(
        [sys.executable, "-m", "soundctm_rt", "bench", *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())["int8"]
    assert {"avx2", "vnni", "amx_int8"} <= set(rep["cpu_features"])
    assert [b["backend"] for b in rep["backends"]] == ["onnxruntime", "openvino"]
    for b in rep["backends"]:
        cells = {(row["steps"], row["path"]) for row in b["rows"]}
        assert cells == {(1, "fused"), (1, "host"), (2, "fused"), (2, "host")}
        for row in b["rows"]:
            assert row["fp32_total_ms"] > 0 and row["int8_total_ms"] > 0 and row["speedup_total"] > 0
            assert (row["path"] == "host") == ("speedup_step" in row)
    assert "INT8 vs float32" in r.stdout
    # a bundle without INT8 variants is a clear error, not a traceback
    plain = tmp_path / "plain"
    shutil.copytree(int8_bundle, plain)
    m = json.loads((plain / "manifest.json").read_text())
    m.pop("int8", None)
    (plain / "manifest.json").write_text(json.dumps(m))
    r = subprocess.run(
        [sys.executable, "-m", "soundctm_rt", "bench", *args[:-4], "--int8", str(plain)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 1 and "export it with --int8" in r.stderr and "Traceback" not in r.stderr
