"""`train distill` on the tiny config: finite losses, EMA updates, exact resume, the export checkpoint written and
exportable. The teacher run is the tiny random model saved in the teacher stage's checkpoint format (the stage
itself is tested in test_train_stages); the dataset is a synthetic three-class corpus. One torch thread."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

CLASSES = ("tone", "noise", "click")
SPLIT_COUNTS = {"train": 5, "valid": 2, "test": 2}


def build_synthetic_corpus(root: Path):
    """Three sound classes with `path, caption, label, split` columns; returns the data Source."""
    import soundfile as sf

    from soundctm_rt.train.data import Source

    rng = np.random.default_rng(0)
    sr, n = 44100, 13000
    rows = []
    for label in CLASSES:
        for split, k in SPLIT_COUNTS.items():
            for j in range(k):
                tt = np.arange(n) / sr
                if label == "tone":
                    x = 0.4 * np.sin(2 * np.pi * (220 + 110 * j) * tt)
                elif label == "noise":
                    x = 0.2 * rng.standard_normal(n)
                else:
                    x = np.zeros(n)
                    x[:: 2000 + 300 * j] = 0.9
                rel = f"{label}/{split}_{j}.wav"
                (root / label).mkdir(parents=True, exist_ok=True)
                sf.write(root / rel, (x * np.hanning(n)).astype(np.float32), sr)
                rows.append({"path": rel, "caption": f"a {label} number {j % 2}", "label": label, "split": split})
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return Source(root, root / "metadata.csv")


@pytest.fixture(scope="module")
def distill_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from soundctm_rt.train.data import DataConfig, prepare_dataset

    root = tmp_path_factory.mktemp("distill_data")
    src = build_synthetic_corpus(root / "corpus")
    out = root / "dataset"
    prepare_dataset([src], out, 44100, 16 * 1024, 1024, DataConfig(max_crops=1), progress=False)
    return out


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny teacher run directory: final/teacher_model.safetensors as `train teacher` writes it (fp32)."""
    from soundctm_rt.train.checkpoint import init_random, save_model_checkpoint
    from soundctm_rt.train.models.config import load_model_config

    run = tmp_path_factory.mktemp("teacher") / "run"
    src = init_random(load_model_config("tiny"), seed=0)
    src.provenance = {"stage": "teacher", "vae_id": "random-tiny-vae"}
    save_model_checkpoint(run / "final" / "teacher_model.safetensors", src, dtype=torch.float32)
    return run


@pytest.fixture(scope="module")
def student_run(distill_dataset: Path, teacher_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from soundctm_rt.train.distill_train import train_distill

    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("student") / "run"
    return train_distill("tiny", teacher_run, distill_dataset, run, threads=1)


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_tiny_distillation_run(student_run: Path, teacher_run: Path) -> None:
    from soundctm_rt.train.checkpoint import load_model_checkpoint
    from soundctm_rt.train.distill_train import DistillConfig

    cfg = json.loads((student_run / "config.json").read_text())
    dcfg = DistillConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg["distill"].items()})
    log = [r for r in _log(student_run) if "loss" in r]
    assert [r["step"] for r in log] == list(range(1, dcfg.steps + 1))
    for r in log:
        assert np.isfinite(r["loss"]) and np.isfinite(r["loss_ctm"]) and np.isfinite(r["loss_dsm"])
        assert 0 <= r["lambda_adapt"] <= 1000 and 1 <= r["n"] <= dcfg.n_max
        for part in ("teacher_solver", "ema_target", "student", "features", "dsm", "backward", "ema_update"):
            assert r[f"time_{part}"] > 0
    # the export checkpoint: the EMA student in fp16, the ω range it was trained on
    path = student_run / "final" / "student_model.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys() if k.startswith("student."))  # noqa: SIM118
    src = load_model_checkpoint(path)
    teacher = load_model_checkpoint(teacher_run / "final" / "teacher_model.safetensors")
    assert src.provenance["stage"] == "distill" and src.provenance["distill"]["distance"] == "teacher_features"
    assert (src.config.edm.omega_min, src.config.edm.omega_max) == dcfg.omega_range(teacher.config.edm)
    # θ⁻ moved away from the teacher, by about (1 − μ^k) of what the student moved
    ckpt = torch.load(student_run / "ckpt" / "last.pt", map_location="cpu", weights_only=False)
    name = "net.proj_out.weight"
    t0 = teacher.student.state_dict()[name]
    moved_ema = (ckpt["ema"][name] - t0).abs().max()
    moved_student = (ckpt["model"][name] - t0).abs().max()
    assert 0 < moved_ema < moved_student
    torch.testing.assert_close(src.student.state_dict()[name], ckpt["ema"][name], atol=1e-3, rtol=1e-3)
    assert len(list((student_run / "samples").rglob("*.wav"))) == len(dcfg.sample_steps)


@pytest.mark.slow
def test_export_checkpoint_is_exportable(student_run: Path, tmp_path: Path) -> None:
    from soundctm_rt.export.pipeline import ExportOptions, export_bundle
    from soundctm_rt.train.checkpoint import load_model_checkpoint

    src = load_model_checkpoint(student_run / "final" / "student_model.safetensors")
    bundle = export_bundle(src, tmp_path / "bundle", ExportOptions(steps=(1,), openvino=False, fuse_decode=False))
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["graphs"]  # parity-checked against torch inside export_bundle


def test_ema_is_updated_after_every_step_and_resume_is_exact(
    distill_dataset: Path, teacher_run: Path, tmp_path: Path
) -> None:
    from soundctm_rt.train.distill_train import train_distill

    over = {"sample_steps": (), "ckpt_every": 2, "class_balance": 1.0}  # balanced epochs resume exactly too
    full = train_distill("tiny", teacher_run, distill_dataset, tmp_path / "full", threads=1, steps=3, **over)
    part = train_distill(
        "tiny", teacher_run, distill_dataset, tmp_path / "part", max_steps=2, threads=1, steps=3, **over
    )
    a2 = torch.load(part / "ckpt" / "last.pt", map_location="cpu", weights_only=False)
    train_distill("tiny", teacher_run, distill_dataset, part, resume=True, threads=1, steps=3, **over)
    a = torch.load(full / "ckpt" / "last.pt", map_location="cpu", weights_only=False)
    b = torch.load(part / "ckpt" / "last.pt", map_location="cpu", weights_only=False)
    assert a["step"] == b["step"] == 3
    for k, v in a["ema"].items():
        assert torch.equal(v, b["ema"][k]), k
        if v.is_floating_point() and k in a2["ema"] and "proj_out" in k:
            # θ⁻_3 = μ·θ⁻_2 + (1 − μ)·θ_3 (METHOD §3.6)
            torch.testing.assert_close(v, 0.999 * a2["ema"][k] + 0.001 * a["model"][k], rtol=1e-5, atol=1e-7)
    assert [r["loss"] for r in _log(full) if "loss" in r] == [r["loss"] for r in _log(part) if "loss" in r]


def test_cli_dry_run_and_switches(distill_dataset: Path, teacher_run: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from soundctm_rt.train.cli import app

    args = ["distill", "-c", "tiny", "--teacher", str(teacher_run), "--data", str(distill_dataset)]
    res = CliRunner().invoke(app, [*args, "--run", str(tmp_path / "r"), "--distance", "l2", "--dry-run"])
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.output)
    assert cfg["distill"]["distance"] == "l2" and cfg["distill"]["lr"] == 8e-5
    assert cfg["model"]["edm"]["omega_min"] <= cfg["model"]["edm"]["default_omega"] <= cfg["model"]["edm"]["omega_max"]
    assert not (tmp_path / "r").exists()
    bad = CliRunner().invoke(app, [*args, "--run", str(tmp_path / "r"), "--distance", "lpips", "--dry-run"])
    assert bad.exit_code != 0


@pytest.mark.slow
def test_two_process_gloo_ddp(distill_dataset: Path, teacher_run: Path, tmp_path: Path) -> None:
    """torchrun with 2 CPU processes draws what 1 process draws: step 1 (same weights) has the same CTM and DSM
    losses. Later steps differ slightly by design: λ_adapt is computed per rank on its half of the batch."""
    import os
    import subprocess
    import sys

    from soundctm_rt.train.distill_train import train_distill

    single = train_distill(
        "tiny", teacher_run, distill_dataset, tmp_path / "single", max_steps=2, threads=1, sample_steps=()
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "soundctm_rt.train", "distill", "-c", "tiny", "--teacher", str(teacher_run)]
    cmd += ["--data", str(distill_dataset), "--run-dir", str(tmp_path / "ddp"), "--max-steps", "2", "--threads", "1"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    a, b = _log(single)[0], _log(tmp_path / "ddp")[0]
    assert a["n"] == b["n"]
    for k in ("loss_ctm", "loss_dsm"):
        assert b[k] == pytest.approx(a[k], rel=1e-4)
    assert all(np.isfinite(r["loss"]) for r in _log(tmp_path / "ddp") if "loss" in r)
    assert (tmp_path / "ddp" / "final" / "student_model.safetensors").is_file()


def test_cost_probe_times_every_part(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from soundctm_rt.train.cli import app

    out = tmp_path / "cost.json"
    res = CliRunner().invoke(
        app, ["distill-cost", "-c", "tiny", "--batch-size", "2", "--n", "1,3", "--repeats", "1", "--json", str(out)]
    )
    assert res.exit_code == 0, res.output
    recs = json.loads(out.read_text())
    assert [r["n"] for r in recs] == [1, 3]
    parts = ("teacher_solver", "ema_target", "student", "features", "dsm", "adaptive_weight", "backward", "ema_update")
    for r in recs:
        assert all(r[f"time_{p}"] > 0 for p in parts)
        assert r["iteration_s"] >= sum(r[f"time_{p}"] for p in parts)


def test_distill_sets_the_students_omega_range_and_default() -> None:
    from soundctm_rt.train.distill_train import DistillConfig, student_model_config
    from soundctm_rt.train.models.config import load_model_config

    mc = load_model_config("tiny")
    s = student_model_config(mc, DistillConfig(omega_min=1.0, omega_max=3.0, default_omega=1.5)).edm
    assert (s.omega_min, s.omega_max, s.default_omega) == (1.0, 3.0, 1.5)
    clamped = student_model_config(mc, DistillConfig(omega_min=1.0, omega_max=3.0)).edm
    assert clamped.default_omega == min(max(mc.edm.default_omega, 1.0), 3.0)
    with pytest.raises(ValueError, match="default_omega"):
        DistillConfig(omega_min=1.0, omega_max=3.0, default_omega=4.0)
