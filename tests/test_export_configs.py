"""Every architecture config builds, and exports through the real pipeline (RAVE's "every config exports")."""

import json

import pytest
import torch

from soundctm_rt.train.checkpoint import init_random
from soundctm_rt.train.models.config import available_configs, load_model_config


def test_configs_are_listed():
    assert {"tiny", "cpu", "gpu"} <= set(available_configs())


@pytest.mark.parametrize("name", available_configs())
def test_config_builds_and_runs(name):
    cfg = load_model_config(name)
    src = init_random(cfg)
    C, T = cfg.latent_channels, cfg.dit.latent_frames
    L, D = cfg.text.max_length, src.text.hidden_size
    from soundctm_rt.train.models.denoiser import Conditioning

    cond = Conditioning(torch.randn(1, L, D), torch.ones(1, L), torch.randn(1, D))
    with torch.no_grad():
        out = src.student.G(torch.randn(1, C, T), torch.tensor([5.0]), torch.tensor([1.0]), cond, torch.tensor([3.5]))
        wav = src.codec.decode(torch.randn(1, C, T))
    assert out.shape == (1, C, T) and torch.isfinite(out).all()
    assert wav.shape == (1, T * cfg.latent_hop)


def test_unknown_keys_are_refused(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[dit]\nwidht = 3\n")
    with pytest.raises(ValueError, match="unknown keys"):
        load_model_config(bad)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in available_configs() if n != "tiny"])
def test_full_size_config_exports(name, tmp_path):
    """The real architectures export and pass the parity gate (1 fused step, ONNX only, to keep it short)."""
    from soundctm_rt.export.pipeline import ExportOptions, export_bundle

    out = export_bundle(
        init_random(load_model_config(name)), tmp_path / name, ExportOptions(steps=(1,), openvino=False)
    )
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["name"] == name and m["graphs"]["student_step"]["attrs"]["flops"] > 0
    depth = m["model"]["config"]["dit"]["depth"]
    for graph in ("student_step", "fused_1"):
        assert m["graphs"][graph]["attrs"]["cpu_fusion"] == {"gelu": depth, "attention": 2 * depth}


@pytest.mark.parametrize(
    "name",
    # the full-size architectures take 20-30 s each: slow (CI runs them); the tiny ones stay in the quick loop
    [pytest.param(n, marks=pytest.mark.slow) if n in ("cpu", "gpu") else n for n in available_configs()],
)
def test_cpu_fusion_covers_every_architecture(name, tmp_path):
    """Every GELU and attention of each config's student step matches export/cpu_fusion.py's patterns (a
    config whose graph the exporter writes differently would silently lose the fused operators)."""
    from soundctm_rt.export.cpu_fusion import fuse_file
    from soundctm_rt.export.onnx_io import export_onnx
    from soundctm_rt.export.wrappers import StudentStepExport

    cfg = load_model_config(name)
    src = init_random(cfg)
    C, T, L, D = cfg.latent_channels, cfg.dit.latent_frames, cfg.text.max_length, src.text.hidden_size
    args = (torch.randn(1, C, T), torch.tensor([5.0]), torch.tensor([0.5]), torch.randn(1, L, D), torch.ones(1, L))
    args += (torch.randn(1, D), torch.tensor([3.5]))
    names = ["x", "t", "s", "tokens", "token_mask", "pooled", "omega"]
    path = tmp_path / "student_step.onnx"
    export_onnx(StudentStepExport(src.student), args, path, names, ["x_s"], dict.fromkeys(names, 0))
    assert fuse_file(path) == {"gelu": cfg.dit.depth, "attention": 2 * cfg.dit.depth}


def test_parity_gate_refuses_an_export_above_tolerance(tiny_source, tmp_path):
    """No backend reproduces torch to 400 dB, so the gate must refuse the export, naming graph and backend."""
    from soundctm_rt.export.parity import ParityError
    from soundctm_rt.export.pipeline import ExportOptions, export_bundle

    with pytest.raises(ParityError, match=r"text_encoder on onnxruntime: output \w+ SNR .* < 400"):
        export_bundle(tiny_source, tmp_path / "b", ExportOptions(steps=(1,), openvino=False, min_snr_db=400.0))
    assert not (tmp_path / "b" / "manifest.json").exists()
