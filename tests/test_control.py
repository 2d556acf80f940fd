"""Intensity control (METHOD §6): the intensity against a direct numpy computation, target curves and their
errors, both methods on the tiny random model, `control generate` and `eval-control` end to end. One thread."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_distill_run import distill_dataset  # noqa: F401 - module fixture

from soundctm_rt.train import control as C
from soundctm_rt.train import control_curves as cc

torch.set_num_threads(1)
PROMPTS = ["a dog barking", "Roland TR-808 snare drum"]


def reference_intensity(y: np.ndarray, hop: int) -> np.ndarray:
    """The docstring's definition, frame by frame in float64."""
    n = len(y)
    w = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(2 * hop) / (2 * hop))  # periodic Hann
    out = []
    for j in range(n // hop):
        start = j * hop - hop // 2
        idx = np.arange(start, start + 2 * hop)
        inside = (idx >= 0) & (idx < n)
        num = np.sum(w[inside] * y[idx[inside]].astype(np.float64) ** 2)
        out.append(10 * np.log10(num / w[inside].sum() + 1e-8))
    return np.array(out)


@pytest.mark.parametrize("n, hop", [(16 * 1024, 1024), (5000, 1024), (3 * 64 + 17, 64), (8 * 63, 63)])
def test_intensity_matches_reference(n, hop):
    rng = np.random.default_rng(n)
    y = (rng.standard_normal((2, n)) * np.linspace(0.001, 0.5, n)).astype(np.float32)
    got = C.intensity_db(torch.from_numpy(y), hop).numpy()
    assert got.shape == (2, n // hop)
    for b in range(2):
        np.testing.assert_allclose(got[b], reference_intensity(y[b], hop), atol=1e-3)


def test_intensity_landmarks_and_gradient():
    t = torch.arange(16 * 1024) / 44100
    sine = torch.sin(2 * torch.pi * 441 * t)[None]
    np.testing.assert_allclose(C.intensity_db(sine, 1024).numpy(), -3.0103, atol=0.02)  # full-scale sine
    assert torch.all(C.intensity_db(torch.zeros(1, 4096), 1024) == C.INTENSITY_FLOOR_DB)
    y = torch.zeros(1, 4096, requires_grad=True)
    C.intensity_db(y, 1024).sum().backward()
    assert torch.isfinite(y.grad).all()  # the soft floor keeps silence differentiable
    level = torch.tensor([[-10.0, -20.0, -30.0]])
    target = torch.tensor([[-10.0, -24.0, -27.0]])
    assert C.db_rmse(level, target).item() == pytest.approx(np.sqrt(25 / 3))
    assert C.db_rmse(level, target, torch.tensor([True, True, False])).item() == pytest.approx(np.sqrt(8))


def test_level_and_shape_split():
    """A gain moves every frame's intensity by its dB; the shape-only loss ignores it; with_level meets the
    target's mean level, within its ±30 dB limit."""
    rng = np.random.default_rng(0)
    y = torch.from_numpy((rng.standard_normal((2, 8 * 1024)) * 0.01).astype(np.float32))
    level = C.intensity_db(y, 1024)
    np.testing.assert_allclose(C.intensity_db(y * 10 ** (6 / 20), 1024).numpy(), level.numpy() + 6, atol=1e-3)
    target = level + torch.tensor([[4.0], [-50.0]]) + torch.linspace(-3, 3, level.shape[1])
    torch.testing.assert_close(C.intensity_loss(level + 7.0, target, shape_only=True),
                               C.intensity_loss(level, target, shape_only=True))  # fmt: skip
    assert torch.all(C.intensity_loss(level, target, shape_only=True) < C.intensity_loss(level, target))
    scaled, gain = C.with_level(y, target, 1024)
    np.testing.assert_allclose(gain.numpy(), [4.0, -C.MAX_LEVEL_GAIN_DB], atol=1e-3)
    assert abs(C.level_offset(C.intensity_db(scaled, 1024), target)[0].item()) < 1e-3


def test_timbre_profile_ignores_level_and_envelope():
    rng = np.random.default_rng(1)
    noise = torch.from_numpy(rng.standard_normal((1, 32 * 1024)).astype(np.float32))
    low = torch.from_numpy(np.convolve(noise[0].numpy(), np.ones(32) / 32, "same").astype(np.float32))[None]
    p = C.timbre_profile(noise, 44100)
    assert p.shape == (1, C.TIMBRE_BANDS)
    env = torch.linspace(0.01, 1.0, noise.shape[1])[None]  # a fade-in: same sound, another envelope
    assert (C.timbre_profile(noise * 0.01, 44100) - p).abs().max() < 1e-3
    assert (C.timbre_profile(noise * env, 44100) - p).pow(2).mean() < 0.5
    assert (C.timbre_profile(low, 44100) - p).pow(2).mean() > 20  # another sound: another profile


def test_presets_fit_the_clip():
    D = 64 * 1024 / 44100
    for name in cc.PRESETS:
        pts = cc.preset_points(name, D)
        times = [t for t, _ in pts]
        assert times == sorted(times) and times[0] >= 0 and times[-1] <= D
        cc.check_points(pts, D, name)
        curve = cc.resample(pts, 64, 44100 / 1024)
        assert curve.shape == (64,) and curve.min() >= cc.PRESET_LOW_DB and curve.max() <= cc.PRESET_HIGH_DB
    fade = cc.resample(cc.preset_points("fade-in", D), 64, 44100 / 1024)
    assert np.all(np.diff(fade) > 0)
    swell = cc.resample(cc.preset_points("swell", D), 64, 44100 / 1024)
    assert 28 <= int(np.argmax(swell)) <= 35
    pulse = cc.resample(cc.preset_points("pulse", D), 64, 44100 / 1024)
    assert int((np.diff(pulse) > 10).sum()) == cc.PULSES - 1  # sharp onsets
    # a short clip: the same shapes, squeezed
    short = cc.resample(cc.preset_points("decay", 0.5), 16, 32.0)
    assert short[0] > -13 and short[-1] < -38


def test_curve_files(tmp_path):
    (tmp_path / "a.csv").write_text("# my curve\nseconds,db\n0, -40\n0.5,-10\n1.0,-30\n")
    pts, _ = cc.load_curve(str(tmp_path / "a.csv"), 1.49)
    assert pts == [(0.0, -40.0), (0.5, -10.0), (1.0, -30.0)]
    np.testing.assert_allclose(cc.resample(pts, 4, 4.0), [-32.5, -17.5, -15.0, -25.0])  # frame centres
    for doc in ([[0, -40], [1, -20]], {"points": [[0, -40], [1, -20]]}, {"seconds": [0, 1], "db": [-40, -20]}):
        (tmp_path / "b.json").write_text(json.dumps(doc))
        assert cc.load_curve(str(tmp_path / "b.json"), 1.49)[0] == [(0.0, -40.0), (1.0, -20.0)]
    assert cc.resample([(0.2, -30.0)], 3, 1.0).tolist() == [-30.0] * 3  # one point: a constant level


@pytest.mark.parametrize(
    "name, text, msg",
    [
        ("a.csv", "0,-10\n0,-20\n", "increase strictly"),
        ("a.csv", "0,-10\n1\n", "expected 2"),
        ("a.csv", "0,-10\n1,loud\n", "not two numbers"),
        ("a.csv", "0,-10\n1,-90\n", "dBFS"),
        ("a.csv", "0,-10\n1,6\n", "dBFS"),
        ("a.csv", "-1,-10\n", "negative"),
        ("a.csv", "0,nan\n", "not finite"),
        ("a.csv", "5,-10\n", "after the clip"),
        ("a.csv", "seconds,db\n", "no points"),
        ("a.json", "{", "not valid JSON"),
        ("a.json", '{"x": 1}', "expected a list"),
        ("a.json", "[[0, -10, 3]]", "expected [seconds, dB]"),
        ("a.json", '{"seconds": [0, 1], "db": [-10]}', "'db' 1"),
        ("a.txt", "0,-10", ".csv or .json"),
    ],
)
def test_malformed_curves(tmp_path, name, text, msg):
    (tmp_path / name).write_text(text)
    with pytest.raises(cc.CurveError, match=msg.replace("[", r"\[")):
        cc.load_curve(str(tmp_path / name), 1.49)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(cc.CurveError, match="neither a preset"):
        cc.load_curve("crescendo", 1.49)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, request):
    from soundctm_rt.train.checkpoint import init_random, save_model_checkpoint
    from soundctm_rt.train.conditioning import encode_prompts
    from soundctm_rt.train.models.config import load_model_config

    src = init_random(load_model_config(getattr(request, "param", "tiny")), seed=0)
    path = save_model_checkpoint(tmp_path_factory.mktemp("ckpt") / "student.safetensors", src, torch.float32)
    mc = src.config
    T, rate = mc.dit.latent_frames, mc.latent_rate
    cond = encode_prompts(src.text, PROMPTS, mc.text.max_length)
    uncond = encode_prompts(src.text, [""], mc.text.max_length).expand(len(PROMPTS))
    jump = C.student_jump(src, cond, uncond, mc.edm.default_omega, 1.0)
    target = torch.from_numpy(
        np.stack([cc.resample(cc.preset_points(p, T / rate), T, rate) for p in ("fade-in", "pulse")])
    )
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(len(PROMPTS), mc.latent_channels, T, generator=g)
    noises = [torch.randn(eps.shape, generator=g) for _ in range(3)]
    return src, path, jump, target, eps, noises


def _err(src, x0, target, shape_only=False):
    with torch.no_grad():
        return C.intensity_loss(C.decoded_intensity(src, x0), target, shape_only=shape_only).sqrt()


# each method, as configured (absolute level; shape + gain; with the timbre anchor), lowers the error it targets
SETTINGS = [{}, {"match_level": True}, {"timbre_weight": 1.0}]


@pytest.mark.parametrize("settings", SETTINGS, ids=["absolute", "match_level", "timbre"])
@pytest.mark.parametrize("tiny", ["tiny", "tiny-mel"], indirect=True)
def test_noise_optimisation_lowers_the_error(tiny, settings):
    src, _, jump, target, eps, noises = tiny
    cfg = C.ControlConfig(noise_iterations=12, **settings)
    shape = cfg.match_level
    for steps in (1, 2):
        base = _err(src, C.sample_uncontrolled(src, jump, eps, noises, steps, 0.0).x0, target, shape)
        res = C.sample_noise_optimised(src, jump, eps, target, steps, cfg)
        assert torch.all(_err(src, res.x0, target, shape) < base), (steps, base)
    # the optimised noise stays on the sphere of a typical Gaussian draw, and the one-step loss falls
    n = eps[0].numel()
    np.testing.assert_allclose(res.eps_T.flatten(1).norm(dim=1).numpy(), np.sqrt(n), rtol=1e-5)
    assert len(res.loss_trace) == 12 and np.all(np.array(res.loss_trace[-1]) < np.array(res.loss_trace[0]))


@pytest.mark.parametrize("tiny", ["tiny", "tiny-mel"], indirect=True)
def test_noise_is_optimised_through_the_sampler_it_is_sampled_with(tiny):
    """The first iteration's error is that of the uncontrolled γ = 0 take with the asked step count (or of the
    one-step map with noise_through_sampler off): the loss sees the take the user gets."""
    src, _, jump, target, eps, noises = tiny

    def first_error(steps: int) -> np.ndarray:
        with torch.no_grad():
            x0 = C.sample_uncontrolled(src, jump, eps, noises, steps, 0.0).x0
            return C.db_rmse(C.loss_features(src, x0)[0], target).numpy()

    for through, want in ((True, 3), (False, 1)):
        cfg = C.ControlConfig(noise_iterations=1, timbre_weight=0.0, noise_through_sampler=through)
        _, trace = C.optimise_noise(src, jump, eps, target, cfg, steps=3)
        np.testing.assert_allclose(trace[0], first_error(want), rtol=1e-4, atol=1e-4)
    assert not np.allclose(first_error(3), first_error(1), rtol=1e-3)  # the two maps do differ


@pytest.mark.parametrize("settings", SETTINGS, ids=["absolute", "match_level", "timbre"])
@pytest.mark.parametrize("tiny", ["tiny", "tiny-mel"], indirect=True)
def test_loss_guidance_lowers_the_error(tiny, settings):
    src, _, jump, target, eps, noises = tiny
    cfg = C.ControlConfig(guidance_iterations=2, **settings)
    shape = cfg.match_level
    for gamma in (0.0, 0.5):
        base = _err(src, C.sample_uncontrolled(src, jump, eps, noises, 4, gamma).x0, target, shape)
        res = C.sample_loss_guided(src, jump, eps, noises, target, 4, gamma, cfg)
        assert torch.all(_err(src, res.x0, target, shape) < base), (gamma, base)
    # without nudges, loss guidance is the uncontrolled γ-sampling
    plain = C.sample_loss_guided(src, jump, eps, noises, target, 4, 0.5, C.ControlConfig(guidance_iterations=0))
    torch.testing.assert_close(plain.x0, C.sample_uncontrolled(src, jump, eps, noises, 4, 0.5).x0)


def test_control_config_is_validated():
    with pytest.raises(ValueError, match="guidance_steps"):
        C.ControlConfig(guidance_steps=1)
    with pytest.raises(ValueError, match="noise_lr"):
        C.ControlConfig(noise_lr=0.0)
    with pytest.raises(ValueError, match="timbre_weight"):
        C.ControlConfig(timbre_weight=-1.0)


CLI = [sys.executable, "-m", "soundctm_rt"]


def run(*args):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300)


def test_control_generate(tiny, tmp_path):
    import soundfile as sf

    _, path, *_ = tiny
    (tmp_path / "c.json").write_text(json.dumps([[0, -50], [0.2, -20]]))
    r = run(
        "control", "generate", "a dog barking", "--intensity", tmp_path / "c.json", "--checkpoint", path,
        "-o", tmp_path / "s", "--variations", 2, "--threads", 1, "--json", "--duration", 0.25,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["seed"] for x in recs] == [0, 1] and all(x["db_rmse"] < x["db_rmse_uncontrolled"] for x in recs)
    audio, sr = sf.read(tmp_path / "s" / "take_000.wav")
    assert sr == 44100 and len(audio) == round(0.25 * 44100) and np.abs(audio).max() > 0


def test_control_generate_errors(tiny, tmp_path):
    from typer.testing import CliRunner

    from soundctm_rt.cli import app

    _, path, *_ = tiny
    out = ["-o", str(tmp_path / "x.wav"), "--threads", "1"]
    ckpt = ["--checkpoint", str(path)]
    usage = [  # exit 2: values the command refuses
        (["--intensity", "crescendo", *ckpt], "neither a preset"),
        (["--intensity", "swell", *ckpt, "--control", "guidance", "--steps", "1"], "--steps 2"),
        (["--intensity", "swell", *ckpt, "--gamma", "0.5"], "γ = 0"),
        (["--intensity", "swell", *ckpt, "--control", "magic"], "noise-opt or guidance"),
        (["--intensity", "swell", *ckpt, "--control-strength", "0"], "(0, 10]"),
        (["--intensity", "swell"], "--checkpoint"),  # no default: the checkpoint is named
    ]
    runner = CliRunner()
    for args, msg in usage:
        r = runner.invoke(app, ["control", "generate", "x", *out, *args])
        assert r.exit_code == 2 and msg in r.output, (args, r.output)
    # exit 1: a failure while doing it
    missing = ["--checkpoint", str(tmp_path / "none.safetensors")]
    r = runner.invoke(app, ["control", "generate", "x", *out, "--intensity", "swell", *missing])
    assert r.exit_code == 1 and "does not exist" in r.output, r.output
    assert not (tmp_path / "x.wav").exists()
    # the runtime's generate has no torch path
    r = runner.invoke(app, ["generate", "x", *out, "--intensity", "swell", *ckpt])
    assert r.exit_code == 2 and "--intensity" in r.output


def test_eval_control_end_to_end(tiny, distill_dataset, tmp_path):  # noqa: F811 - fixture
    _, path, *_ = tiny
    r = run(
        "eval-control", "--checkpoint", path, "--data", distill_dataset, "--json", tmp_path / "c.json",
        "--markdown", tmp_path / "c.md", "--png", tmp_path / "c.png", "--prompts", 3, "--steps", 2,
        "--noise-iterations", 3, "--guidance-iterations", 1, "--embedding", "logmel", "--threads", 1, "--batch", 5,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "c.json").read_text())
    assert res["config"]["cases"] == 3 * len(cc.PRESETS) and len(res["cases"]) == 12
    rows = {(x["method"], x["steps"]) for x in res["rows"]}
    assert rows == {("uncontrolled", 1), ("uncontrolled", 2), ("level_only", 2), ("noise_optimisation", 1),
                    ("noise_optimisation", 2), ("loss_guidance", 2)}  # fmt: skip
    for key in ("uncontrolled_db_rmse", "level_only_db_rmse", "noise_optimisation_db_rmse", "loss_guidance_db_rmse"):
        assert np.isfinite(res[key]) and res[key] > 0
    assert all(0 <= x["adherence"] <= 1 and x["seconds_per_clip"] > 0 for x in res["rows"])
    md = (tmp_path / "c.md").read_text()
    assert "loss_guidance" in md and "c.png" in md and (tmp_path / "c.png").stat().st_size > 10_000
