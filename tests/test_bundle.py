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


def _write_manifest(root, m):
    """Replace manifest.json as a hand edit would (it is not hashed)."""
    (root / "manifest.json").write_text(json.dumps(m))


def _drop_bytes(m):
    del m["files"]["tokenizer.json"]["bytes"]
    return m


def _graphs_list(m):
    m["graphs"] = list(m["graphs"])
    return m


def _steps_as_text(m):
    m["guidance"]["default_steps"] = "1"
    return m


def _no_channels(m):
    del m["latent"]["channels"]
    return m


def _path_outside(m):
    m["text"]["tokenizer"] = "../tokenizer.json"
    return m


def _input_without_shape(m):
    del m["graphs"]["student_step"]["inputs"][0]["shape"]
    return m


@pytest.mark.parametrize(
    "edit, msg",
    [
        (lambda m: [], r"not a soundctm-rt manifest \(a JSON list"),
        (lambda m: "bundle", "not a soundctm-rt manifest"),
        (_drop_bytes, r"'files\.tokenizer\.json' lacks 'bytes'"),
        (_graphs_list, "'graphs' must be an object, not list"),
        (_steps_as_text, r"'guidance\.default_steps' must be an integer"),
        (_no_channels, r"the vae latent lacks \['channels'\]"),
        (_path_outside, "must be a relative path inside the bundle"),
        (_input_without_shape, r"'graphs\.student_step\.inputs\[0\]' must be an object with a 'name' and a 'shape'"),
    ],
)
def test_malformed_manifest_is_refused_naming_the_field(bundle_copy, edit, msg):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    _write_manifest(bundle_copy, edit(m))
    with pytest.raises(BundleError, match=msg) as refused:
        Bundle.open(bundle_copy)
    assert "export" in str(refused.value)  # the fix: re-export (or point at an exported bundle)


@pytest.mark.parametrize("graph", ["student_step", "fused_2"])
def test_graph_without_a_verified_file_is_refused_at_load(bundle_copy, graph):
    """A graph file deleted together with its `files` entry is found when the bundle opens, not when used."""
    m = json.loads((bundle_copy / "manifest.json").read_text())
    rel = m["graphs"][graph]["files"]["onnxruntime"]
    (bundle_copy / rel).unlink()
    del m["files"][rel]
    _write_manifest(bundle_copy, m)
    with pytest.raises(BundleError, match=rf"graph '{graph}' names {rel}, which its file table does not list"):
        Bundle.open(bundle_copy, verify=False)


def test_fused_steps_without_their_graph_are_refused(bundle_copy):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    del m["graphs"]["fused_4"]
    _write_manifest(bundle_copy, m)
    with pytest.raises(BundleError, match="'fused_steps' lists 4 but there is no graph 'fused_4'"):
        Bundle.open(bundle_copy)


def test_default_bundle_reads_as_the_typed_manifest():
    from soundctm_rt.bundle import default_bundle_path

    path = default_bundle_path()
    if path is None:
        pytest.skip("this install ships no default model")
    b = Bundle.open(path, verify=False)
    assert b.spec.latent.kind == b.manifest["latent"].get("kind", "vae")
    assert b.spec.text.max_length == b.manifest["text"]["max_length"]
    assert set(b.spec.files) == set(b.manifest["files"])
