"""VAE and teacher stages, tiny config: loss falls, outputs exist, resume is exact, 2-process DDP matches.

All runs use one torch thread (the CI machine has 2 cores) and the fixture corpus of test_train_data.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train_data import build_corpus

from soundctm_rt.train.data import prepare_dataset


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in _log(run) if "loss" in r]


def _ckpt(run: Path) -> dict:
    return torch.load(run / "ckpt" / "last.pt", map_location="cpu", weights_only=False)


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for part in ("model", "ema"):
        if a[part] is None:
            assert b[part] is None
            continue
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), f"{part}.{k} differs after resume"
    for sa, sb in zip(a["opt"]["state"].values(), b["opt"]["state"].values(), strict=True):
        for k in sa:
            assert torch.equal(sa[k], sb[k])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from soundctm_rt.train.data import DataConfig

    root = tmp_path_factory.mktemp("stages")
    sources, _ = build_corpus(root)
    out = root / "dataset"
    prepare_dataset(sources, out, 44100, 16 * 1024, 1024, DataConfig(max_crops=2), progress=False)
    return out


@pytest.fixture(scope="module")
def vae_run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from soundctm_rt.train.vae_train import train_vae

    run = tmp_path_factory.mktemp("vae") / "run"
    torch.set_num_threads(1)
    return train_vae("tiny", dataset, run, threads=1, steps=12)


def test_vae_trains_and_finalises(vae_run: Path, dataset: Path) -> None:
    losses = _losses(vae_run)
    assert len(losses) == 12 and all(np.isfinite(losses))
    valid = [r for r in _log(vae_run) if "valid_mel_l1" in r]
    assert [r["step"] for r in valid] == [6, 12] and all(np.isfinite(r["valid_si_sdr_db"]) for r in valid)
    assert len(list((vae_run / "samples" / "vae_0000012").glob("*.wav"))) == 4
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    cfg = json.loads((vae_run / "config.json").read_text())
    assert cfg["vae_train"]["steps"] == 12 and cfg["model"]["name"] == "tiny"
    from safetensors.torch import load_file

    fp16 = load_file(str(vae_run / "final" / "vae_fp16.safetensors"))
    assert all(v.dtype == torch.float16 for v in fp16.values() if v.is_floating_point())
    stats = load_file(str(vae_run / "final" / "latent_stats.safetensors"))
    assert stats["latent_mean"].shape == (8,) and torch.all(stats["latent_std"] > 0)
    # the statistics are those of the cached training latents
    from soundctm_rt.train.data import ClipDataset

    ds = ClipDataset(dataset)
    vae_id = json.loads((vae_run / "final" / "latent_stats.json").read_text())["vae_id"]
    lat = np.load(dataset / "latents" / vae_id / "latents.npy")
    assert lat.shape == (len(ds), 8, 16)
    np.testing.assert_allclose(
        lat[ds.indices("train")].mean(axis=(0, 2)), stats["latent_mean"].numpy(), rtol=1e-4, atol=1e-5
    )
    rep = json.loads((vae_run / "report" / "test_metrics.json").read_text())
    assert rep["clips"] == len(ds.indices("test"))
    for method in ("vae", "baseline_mel128_griffin_lim32", "baseline_mel_pca4_griffin_lim32"):  # tiny: 8 ch
        for key in ("mr_stft", "mel_l1", "si_sdr_db", "mr_stft_sounding", "mel_l1_sounding"):
            assert np.isfinite(rep[method][key]), (method, key)
    # more principal components keep more of the mel spectrogram
    assert rep["baseline_mel128_griffin_lim32"]["mel_l1"] < rep["baseline_mel_pca4_griffin_lim32"]["mel_l1"]
    assert (vae_run / "report" / "test_spectrograms.png").stat().st_size > 10_000


def test_vae_resume_is_exact(dataset: Path, tmp_path: Path) -> None:
    from soundctm_rt.train.vae_train import train_vae

    full = train_vae("tiny", dataset, tmp_path / "full", threads=1, finalize=False)
    part = train_vae("tiny", dataset, tmp_path / "part", max_steps=3, threads=1, finalize=False)
    with pytest.raises(FileExistsError):
        train_vae("tiny", dataset, part, threads=1, finalize=False)  # a checkpoint exists: needs --resume
    train_vae("tiny", dataset, part, resume=True, threads=1, finalize=False)
    _assert_same_state(_ckpt(full), _ckpt(part))
    assert _losses(full) == _losses(part)


def test_teacher_trains_samples_and_resumes(dataset: Path, vae_run: Path, tmp_path: Path) -> None:
    from soundctm_rt.train.checkpoint import load_model_checkpoint
    from soundctm_rt.train.teacher_train import train_teacher

    run = train_teacher("tiny", dataset, vae_run, tmp_path / "long", threads=1, steps=40, batch_size=8, ckpt_every=40)
    losses = _losses(run)
    assert len(losses) == 40 and all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    assert [r["step"] for r in _log(run) if np.isfinite(r.get("valid_loss", np.nan))] == [40]
    samples = run / "samples" / "teacher_0000040"
    assert (samples / "spectrograms.png").is_file() and len(list(samples.glob("*.wav"))) == 2
    src = load_model_checkpoint(run / "final" / "teacher_model.safetensors")
    assert src.provenance["stage"] == "teacher" and src.latent_std.shape == (8,)
    assert (run / "final" / "teacher_ema_fp16.safetensors").is_file()

    # class-balanced epochs (repeat-factor sampling) resume exactly too: the epoch is a pure function of labels
    full = train_teacher("tiny", dataset, vae_run, tmp_path / "full", threads=1, class_balance=0.5)
    part = train_teacher("tiny", dataset, vae_run, tmp_path / "part", max_steps=3, threads=1, class_balance=0.5)
    train_teacher("tiny", dataset, vae_run, part, resume=True, threads=1, class_balance=0.5)
    assert json.loads((part / "config.json").read_text())["teacher_train"]["class_balance"] == 0.5
    _assert_same_state(_ckpt(full), _ckpt(part))
    assert _losses(full) == _losses(part)


def test_teacher_on_the_mel_code_trains_then_distils(dataset: Path, tmp_path: Path) -> None:
    """latent = "mel": no VAE run; the code and its statistics are cached in the dataset, the checkpoint holds
    no codec weights, and distillation and export take it as they take a VAE teacher."""
    from soundctm_rt.train.checkpoint import load_model_checkpoint
    from soundctm_rt.train.distill_train import train_distill
    from soundctm_rt.train.latent import MelCodec, mel_id
    from soundctm_rt.train.models.config import load_model_config
    from soundctm_rt.train.teacher_train import train_teacher

    with pytest.raises(ValueError, match="only to latent = 'vae'"):
        train_teacher("tiny-mel", dataset, tmp_path / "nope", tmp_path / "bad", threads=1)
    run = train_teacher("tiny-mel", dataset, None, tmp_path / "teacher", threads=1, steps=30, batch_size=8)
    losses = _losses(run)
    assert len(losses) == 30 and all(np.isfinite(losses)) and np.mean(losses[-8:]) < np.mean(losses[:8])
    assert len(list((run / "samples" / "teacher_0000030").glob("*.wav"))) == 2
    cache = dataset / "latents" / mel_id(load_model_config("tiny-mel").mel)
    assert (cache / "latents.npy").is_file() and (cache / "latent_stats.safetensors").is_file()
    src = load_model_checkpoint(run / "final" / "teacher_model.safetensors")
    assert isinstance(src.codec, MelCodec) and src.latent_std.shape == (32,)
    assert src.provenance["latent"] == "mel"
    z = src.codec.encode(torch.zeros(1, 16 * 1024))[0]
    assert z.shape == (1, 32, 32)
    # a new run can start from the checkpoint's weights (the run directory of the first may be gone)
    more = train_teacher(
        "tiny-mel",
        dataset,
        None,
        tmp_path / "more",
        threads=1,
        steps=2,
        batch_size=8,
        init_from=run / "final" / "teacher_model.safetensors",
    )
    assert json.loads((more / "config.json").read_text())["init_from"].endswith("teacher_model.safetensors")
    assert _losses(more)[0] < np.mean(losses[:8])  # it starts trained, not from scratch
    from soundctm_rt.train.teacher_train import _initial_weights

    mc = load_model_config("tiny-mel")
    ckpt = run / "final" / "teacher_model.safetensors"
    wider = dataclasses.replace(mc, dit=dataclasses.replace(mc.dit, width=64))
    with pytest.raises(ValueError, match="architecture or latent differs"):
        _initial_weights(ckpt, wider, src.latent_mean, src.latent_std)
    with pytest.raises(ValueError, match="statistics differ"):
        _initial_weights(ckpt, mc, src.latent_mean + 1.0, src.latent_std)
    # the same corpus prepared again elsewhere: statistics a hundredth of a nat away keep the checkpoint's own
    _, mu, std = _initial_weights(ckpt, mc, src.latent_mean + 0.01, src.latent_std * 1.001)
    assert torch.equal(mu, src.latent_mean.float()) and torch.equal(std, src.latent_std.float())
    student = train_distill("tiny-mel", run, dataset, tmp_path / "student", threads=1, steps=2, sample_steps=())
    out = load_model_checkpoint(student / "final" / "student_model.safetensors")
    assert isinstance(out.codec, MelCodec) and torch.equal(out.latent_mean, src.latent_mean)


def test_dry_run_prints_config_and_writes_nothing(dataset: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from soundctm_rt.train.cli import app

    res = CliRunner().invoke(
        app,
        [
            "vae",
            "-c",
            "tiny",
            "--data",
            str(dataset),
            "--run",
            str(tmp_path / "r"),
            "--steps",
            "9",
            "--dry-run",
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["vae_train"]["steps"] == 9
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_two_process_gloo_ddp_matches_one_process(dataset: Path, vae_run: Path, tmp_path: Path) -> None:
    """torchrun with 2 CPU processes: the same global batches and noise as 1 process, so the same losses."""
    from soundctm_rt.train.teacher_train import train_teacher

    single = train_teacher("tiny", dataset, vae_run, tmp_path / "single", max_steps=3, threads=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "soundctm_rt.train",
        "teacher",
        "-c",
        "tiny",
        "--data",
        str(dataset),
        "--vae",
        str(vae_run),
        "--run-dir",
        str(tmp_path / "ddp"),
        "--max-steps",
        "3",
        "--threads",
        "1",
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    np.testing.assert_allclose(_losses(tmp_path / "ddp"), _losses(single), rtol=1e-4)
    a, b = _ckpt(single), _ckpt(tmp_path / "ddp")
    assert b["world"] == 2
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=5e-5 * 3)  # Adam: ≤ lr-sized steps apart


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(dataset: Path, vae_run: Path, tmp_path: Path) -> None:
    """SIGKILL a teacher run after a checkpoint, resume it: same weights, optimiser state and losses."""
    import signal
    import time

    from soundctm_rt.train.teacher_train import train_teacher

    kw = {"steps": 300, "batch_size": 4, "ckpt_every": 5, "sample_every": 10_000}
    killed = tmp_path / "killed"
    code = (
        "from soundctm_rt.train.teacher_train import train_teacher\n"
        f"train_teacher('tiny', {str(dataset)!r}, {str(vae_run)!r}, {str(killed)!r}, threads=1, **{kw!r})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            log = killed / "log.jsonl"  # lines may be half-written here: count them, do not parse
            if (killed / "ckpt" / "last.pt").is_file() and log.is_file() and log.read_text().count("\n") >= 12:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert 0 < _ckpt(killed)["step"] < 300
    train_teacher("tiny", dataset, vae_run, killed, resume=True, threads=1, **kw)
    full = train_teacher("tiny", dataset, vae_run, tmp_path / "full", threads=1, **kw)
    _assert_same_state(_ckpt(full), _ckpt(killed))
    assert [r["step"] for r in _log(killed) if "loss" in r] == list(range(1, 301))
    assert _losses(full) == _losses(killed)


def test_resume_may_extend_the_steps_but_change_nothing_else():
    from soundctm_rt.train.loop import _allow_extension

    old = {"distill": {"steps": 600, "lr": 8e-5}, "model": {"width": 256}}
    merged, ext = _allow_extension(old, {"distill": {"steps": 1400, "lr": 8e-5}, "model": {"width": 256}})
    assert merged["distill"]["steps"] == 1400 and ext == {"distill": (600, 1400)}
    assert old["distill"]["steps"] == 600  # the caller's dict is not modified
    merged, ext = _allow_extension(old, {"distill": {"steps": 300, "lr": 8e-5}, "model": {"width": 256}})
    assert merged["distill"]["steps"] == 600 and ext == {}  # fewer steps: still a difference, refused by start()


def test_vae_decoder_finetune_keeps_the_latent_space(dataset: Path, vae_run: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from soundctm_rt.train.checkpoint import init_random, swap_vae
    from soundctm_rt.train.models.config import load_model_config
    from soundctm_rt.train.vae_decoder_train import train_vae_decoder
    from soundctm_rt.train.vae_train import load_latent_stats, load_vae_run

    long = train_vae_decoder("tiny", dataset, vae_run, tmp_path / "long", threads=1, steps=60, ckpt_every=60)
    losses = _losses(long)
    assert len(losses) == 60 and all(np.isfinite(losses))
    assert np.mean(losses[-15:]) < np.mean(losses[:15])
    run = train_vae_decoder("tiny", dataset, vae_run, tmp_path / "dec", threads=1)
    losses = _losses(run)
    parent, cfg, parent_id = load_vae_run(vae_run)
    child, _, child_id = load_vae_run(run)
    assert child_id != parent_id
    for k, v in parent.encoder.state_dict().items():
        assert torch.equal(v, child.encoder.state_dict()[k]), k  # frozen encoder: same latents
    assert any(not torch.equal(v, child.decoder.state_dict()[k]) for k, v in parent.decoder.state_dict().items()), (
        "the decoder did not change"
    )
    for a, b in zip(load_latent_stats(vae_run), load_latent_stats(run), strict=True):
        assert torch.equal(a, b)
    np.testing.assert_array_equal(
        np.load(dataset / "latents" / parent_id / "latents.npy"),
        np.load(dataset / "latents" / child_id / "latents.npy"),
    )
    assert (run / "report" / "test_metrics.json").is_file()
    assert json.loads((run / "final" / "parent.json").read_text())["parent_vae_id"] == parent_id
    assert load_file(str(run / "final" / "vae_fp16.safetensors"))

    # resume equality, like the other stages
    part = train_vae_decoder("tiny", dataset, vae_run, tmp_path / "part", max_steps=4, threads=1, finalize=False)
    train_vae_decoder("tiny", dataset, vae_run, part, resume=True, threads=1, finalize=False)
    a, b = _ckpt(run), _ckpt(part)
    assert a["step"] == b["step"] == 8 and len(losses) == 8
    for k, v in a["decoder"].items():
        assert torch.equal(v, b["decoder"][k]), k
    assert _losses(part) == losses

    # swap into a model checkpoint of the parent's latent space; a foreign VAE is refused
    src = init_random(load_model_config("tiny"))
    mu, std = load_latent_stats(vae_run)
    src.codec, src.latent_mean, src.latent_std = parent, mu, std
    swapped = swap_vae(src, child, *load_latent_stats(run), {"vae_id": child_id})
    assert swapped.codec is child and swapped.provenance["vae_swap"]["vae_id"] == child_id
    with pytest.raises(ValueError, match="encoder"):
        swap_vae(src, init_random(cfg, seed=3).codec, mu, std, {})


def test_sigma_profile_scores_what_the_denoiser_does(dataset: Path) -> None:
    """With F = 0 the denoiser is D = c_skip·x_σ, whose error has a closed form and ignores the caption."""
    from soundctm_rt.train.checkpoint import init_random
    from soundctm_rt.train.data import ClipDataset
    from soundctm_rt.train.latent import normalise
    from soundctm_rt.train.models.config import load_model_config
    from soundctm_rt.train.sigma_profile import format_profile, sigma_profile

    src = init_random(load_model_config("tiny-mel"))
    torch.nn.init.zeros_(src.student.net.proj_out.weight)
    torch.nn.init.zeros_(src.student.net.proj_out.bias)
    ds = ClipDataset(dataset)
    report = sigma_profile(src, ds, n_clips=6, sigmas=(0.1, 1.0, 10.0), seed=3)
    idx = np.concatenate([ds.indices("valid"), ds.indices("test")])
    idx = np.sort(np.random.default_rng(3).choice(idx, min(6, len(idx)), replace=False))
    x0 = normalise(src.codec.encode(torch.from_numpy(ds.wave(idx)))[0], src.latent_mean, src.latent_std)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    sd = src.student.sigma_data
    assert report["clips"] == len(idx) and [r["sigma"] for r in report["rows"]] == [0.1, 1.0, 10.0]
    for row in report["rows"]:
        s = row["sigma"]
        c_skip = sd**2 / (s**2 + sd**2)
        expected = float(((c_skip * (x0 + s * eps) - x0) ** 2).mean()) / sd**2
        assert row["cond"] == pytest.approx(expected, rel=1e-4)
        assert row["empty"] == pytest.approx(row["cond"], rel=1e-6) and row["gain"] == pytest.approx(1.0, rel=1e-6)
    assert "| 10 |" in format_profile(report)


def test_level_calibration_checks_the_runtime_level_constant(dataset: Path) -> None:
    """The offset the runtime's level setting ships with (level.PEAK_OFFSET_DB, measured on 229 training clips
    of the full corpora) holds on the fixture corpus within the predictor's spread, and the report's figures
    are the decoded peaks themselves."""
    from soundctm_rt.level import PEAK_OFFSET_DB, predicted_peak_dbfs
    from soundctm_rt.melcode import MelCodeConfig, MelDecoder, log_mel
    from soundctm_rt.train.data import ClipDataset
    from soundctm_rt.train.level_calibration import format_calibration, level_calibration

    ds, cfg = ClipDataset(dataset), MelCodeConfig()
    r = level_calibration(ds, cfg, n_clips=24)
    assert r["clips"] == min(24, len(ds.indices("train")))
    assert r["source_peak_dbfs"]["median"] == pytest.approx(-1.0, abs=0.05)  # prepare's peak normalisation
    # 11 crops of 0.37 s here read 14.7 (the 229 full clips 18.15): within the error's spread, not its 20 dB scale
    assert abs(r["offset_db"] - PEAK_OFFSET_DB) < 5.0, r
    assert r["error_db"]["std"] < 6.0, r
    w = ds.wave(ds.indices("train")[:1])
    z = log_mel(w, cfg)
    dec = MelDecoder(cfg)
    one = level_calibration(ds, cfg, n_clips=1)  # the first clip
    err = 20 * np.log10(np.abs(dec.decode(z)).max()) - predicted_peak_dbfs(dec, z)[0]
    assert one["error_db"]["mean"] == pytest.approx(err, abs=0.01)
    assert "PEAK_OFFSET_DB" in format_calibration(r)
