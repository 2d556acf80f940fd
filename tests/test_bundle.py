"""The bundle contract: the runtime refuses anything it cannot trust, naming the file and the fix."""

import json
import shutil
import zipfile

import pytest

from soundctm_rt.bundle import SCHEMA_VERSION, Bundle, BundleError


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundle, dst)
    return dst


def test_open_valid_bundle(tiny_bundle):
    b = Bundle.open(tiny_bundle)
    assert b.fused_steps == [1, 2, 4]
    assert {
        "text_encoder",
        "student_step",
        "fused_1",
        "fused_2",
        "fused_4",
        "vae_decoder",
        "vae_decoder_stream",
    } <= set(b.graphs)
    for g in b.graphs.values():
        assert set(g.files) == {"onnxruntime", "openvino"}
    m = b.manifest
    assert m["schema_version"] == SCHEMA_VERSION
    assert len(m["latent"]["mean"]) == m["latent"]["channels"] == len(m["latent"]["std"])
    for graph, per_backend in m["parity"]["graphs"].items():
        for backend, outs in per_backend.items():
            for out, fig in outs.items():
                assert fig["snr_db"] == "inf" or fig["snr_db"] >= m["parity"]["min_snr_db"], (
                    graph,
                    backend,
                    out,
                )


def test_tampered_file_is_named(bundle_copy):
    target = bundle_copy / "onnx" / "weights.bin"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"onnx/weights\.bin.*sha256"):
        Bundle.open(bundle_copy)


def test_truncated_file_is_named(bundle_copy):
    target = bundle_copy / "openvino" / "student_step.xml"
    target.write_bytes(target.read_bytes()[:100])
    with pytest.raises(BundleError, match=r"openvino/student_step\.xml.*truncated"):
        Bundle.open(bundle_copy)


def test_missing_file_is_named(bundle_copy):
    (bundle_copy / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"tokenizer\.json is missing"):
        Bundle.open(bundle_copy)


def test_unknown_schema_version(bundle_copy):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["schema_version"] = SCHEMA_VERSION + 1
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="schema version"):
        Bundle.open(bundle_copy)


def test_corrupt_manifest(bundle_copy):
    (bundle_copy / "manifest.json").write_text("{ not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.open(bundle_copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        Bundle.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match=r"manifest\.json is missing"):
        Bundle.open(tmp_path / "empty")


def test_zipped_bundle(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("SOUNDCTM_RT_CACHE", str(tmp_path / "cache"))
    z = tmp_path / "tiny.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in tiny_bundle.rglob("*"):
            if p.is_file():
                zf.write(p, p.relative_to(tiny_bundle.parent))
    b = Bundle.open(z)
    assert b.fused_steps == [1, 2, 4]
    assert Bundle.open(z).root == b.root  # extracted once, then reused
