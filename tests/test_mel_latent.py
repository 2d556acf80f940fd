"""The fixed log-mel latent (METHOD §5b): one code in numpy and torch, a decoder that streams exactly, keeps the
level and the spectrum, and a tiny-mel model that trains, exports and generates through the runtime."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from soundctm_rt.bundle import Bundle, BundleError
from soundctm_rt.melcode import MelCodeConfig, MelDecoder, log_mel, mel_filterbank, stft_magnitude

SR = 44100


def _signals(n: int) -> np.ndarray:
    """[3, n]: a 440 Hz tone with a decay, a noise burst with a sharp attack, a click train."""
    t = np.arange(n) / SR
    tone = 0.5 * np.sin(2 * np.pi * 440 * t) * np.exp(-2 * t)
    rng = np.random.default_rng(0)
    burst = np.zeros(n)
    a = n // 3
    burst[a:] = rng.standard_normal(n - a) * 0.3 * np.exp(-20 * t[: n - a])
    clicks = np.zeros(n)
    clicks[:: SR // 8] = 0.9
    return np.stack([tone, burst, clicks]).astype(np.float32)


def test_filterbank_is_slaney_and_covers_the_band():
    cfg = MelCodeConfig()
    fb = mel_filterbank(cfg)
    assert fb.shape == (128, 1025) and fb.min() >= 0
    # every bin between the first and last filter centre is covered; the area normalisation makes the filters'
    # peaks fall as they widen
    covered = fb.sum(0) > 0
    assert covered[2:-2].all()
    assert fb[0].max() > fb[-1].max()


def test_torch_encode_matches_numpy_code():
    from soundctm_rt.train.latent import MelCodec

    cfg = MelCodeConfig()
    w = _signals(64 * cfg.hop)
    z_np = log_mel(w, cfg)
    z_t, logvar = MelCodec(cfg).encode(torch.from_numpy(w))
    assert z_np.shape == (3, 128, 64)
    np.testing.assert_allclose(z_t.numpy(), z_np, atol=5e-3)  # float32 FFTs differ near the log floor
    assert float(logvar.abs().max()) == 0.0


def test_stream_concatenates_to_decode_and_first_chunk_is_short():
    cfg = MelCodeConfig(iterations=8, chunk_frames=32)
    dec = MelDecoder(cfg)
    z = log_mel(_signals(80 * cfg.hop), cfg)
    chunks = list(dec.stream(z))
    assert [c.shape[-1] for c in chunks] == [32 * cfg.hop, 32 * cfg.hop, 16 * cfg.hop]
    np.testing.assert_array_equal(np.concatenate(chunks, -1), dec.decode(z))


def _mel_l1(w: np.ndarray, y: np.ndarray, cfg: MelCodeConfig) -> np.ndarray:
    return np.abs(log_mel(w, cfg) - log_mel(y, cfg)).mean(axis=(1, 2))


def test_round_trip_keeps_spectrum_and_level():
    cfg = MelCodeConfig(iterations=16)
    w = _signals(64 * cfg.hop)
    y = MelDecoder(cfg).decode(log_mel(w, cfg))
    assert y.shape == w.shape and np.isfinite(y).all()
    assert (_mel_l1(w, y, cfg)[:2] < 0.3).all()  # a broken decoder reads > 1.5
    # clicks stay clicks: the loudest analysis frames of the decoded train are the clicks' frames
    e_in, e_out = stft_magnitude(w[2:], cfg)[0].sum(0), stft_magnitude(y[2:], cfg)[0].sum(0)
    assert set(np.argsort(e_out)[-4:]) <= set(np.argsort(e_in)[-6:])
    # level: RMS within 3 dB (the click train too, thanks to the per-frame level correction); peaks within
    # 4.5 dB for the tone and the burst (a 2048-sample code smears a one-sample click's peak, not its energy)
    rms = 20 * np.log10(np.sqrt((y**2).mean(1)) / np.sqrt((w**2).mean(1)))
    peak = 20 * np.log10(np.abs(y).max(1) / np.abs(w).max(1))
    assert np.abs(rms).max() < 3.0, rms
    assert np.abs(peak[:2]).max() < 4.5, peak
    # a tone stays a tone: the spectral peak of the decoded tone is at 440 Hz
    spec = stft_magnitude(y[:1], cfg)[0].mean(1)
    assert abs(int(spec.argmax()) * SR / cfg.n_fft - 440) < 2 * SR / cfg.n_fft


def test_more_iterations_and_momentum_help():
    w = _signals(32 * 1024)
    errs = {}
    for it, mom in ((0, 0.99), (4, 0.0), (16, 0.99)):
        cfg = MelCodeConfig(iterations=it, momentum=mom)
        y = MelDecoder(cfg).decode(log_mel(w, cfg))
        S, S2 = stft_magnitude(w, cfg), stft_magnitude(y, cfg)
        errs[(it, mom)] = float(np.linalg.norm(S - S2) / np.linalg.norm(S))
    assert errs[(16, 0.99)] < errs[(4, 0.0)] < errs[(0, 0.99)], errs


def test_chunked_decoding_is_close_to_whole_clip_griffin_lim():
    w = _signals(32 * 1024)
    cfg = MelCodeConfig(iterations=16)
    whole = dataclasses.replace(cfg, chunk_frames=64)  # one chunk: plain fast Griffin-Lim over the clip
    e_chunk = _mel_l1(w, MelDecoder(cfg).decode(log_mel(w, cfg)), cfg)
    e_whole = _mel_l1(w, MelDecoder(whole).decode(log_mel(w, whole)), cfg)
    assert (e_chunk < e_whole + 0.05).all(), (e_chunk, e_whole)


def test_intensity_from_the_mel_matches_the_waveform_rms():
    from soundctm_rt.train.latent import MelCodec

    cfg = MelCodeConfig()
    n = 32 * cfg.hop
    t = np.arange(n) / SR
    w = np.stack([0.1 * np.random.default_rng(1).standard_normal(n), np.sin(2 * np.pi * 440 * t)]).astype(np.float32)
    db = MelCodec(cfg).intensity_db(torch.from_numpy(log_mel(w, cfg)))
    rms_db = 20 * np.log10(np.sqrt((w**2).mean(1)))
    np.testing.assert_allclose(db[:, 4:-4].mean(1).numpy(), rms_db, atol=1.5)


def test_config_validation():
    with pytest.raises(ValueError, match="syn_hop"):
        MelCodeConfig(syn_hop=300)
    with pytest.raises(ValueError, match="momentum"):
        MelCodeConfig(momentum=1.0)


# ---- the tiny-mel model through export and the runtime ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_mel_bundle(tmp_path_factory):
    from soundctm_rt.export.pipeline import ExportOptions, export_bundle
    from soundctm_rt.train.checkpoint import init_random
    from soundctm_rt.train.models.config import load_model_config

    src = init_random(load_model_config("tiny-mel"), seed=0)
    assert src.config.mel.iterations != 3
    opts = ExportOptions(steps=(1, 2), decoder_iterations=3)  # a decoder setting the export may change
    return export_bundle(src, tmp_path_factory.mktemp("mel") / "b", opts)


def test_mel_bundle_has_no_decoder_graphs_and_states_its_code(tiny_mel_bundle):
    b = Bundle.open(tiny_mel_bundle)
    lat = b.manifest["latent"]
    assert lat["kind"] == "mel" and lat["mel"]["n_mels"] == lat["channels"] == 32 and lat["hop"] == 512
    assert lat["mel"]["iterations"] == 3
    assert len(lat["mean"]) == 32 and len(lat["std"]) == 32
    assert not {"vae_decoder", "vae_decoder_stream"} & set(b.graphs)
    assert b.graph("fused_1").attrs["decode"] is False


def test_typed_sections_are_what_export_wrote(tiny_mel_bundle, tiny_bundle):
    """The export writes the typed sections through the manifest's own classes: reading and writing them back
    gives the same JSON, for both latent kinds."""
    from soundctm_rt.manifest import Manifest

    for bundle in (tiny_mel_bundle, tiny_bundle):
        raw = json.loads((bundle / "manifest.json").read_text())
        m = Manifest.from_dict(raw, str(bundle))
        for section in ("audio", "latent", "edm", "guidance", "text"):
            assert getattr(m, section).to_dict() == raw[section], section
        assert {name: g.to_dict() for name, g in m.graphs.items()} == raw["graphs"]
        assert [lic.to_dict() for lic in m.licenses] == raw["licenses"]


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_mel_engine_fused_host_and_stream_agree(tiny_mel_bundle, backend):
    from soundctm_rt.engine import Engine

    eng = Engine(tiny_mel_bundle, backend=backend)
    fused, tf = eng.generate("a dog barking", seed=3, steps=2, fused=True)
    host, th = eng.generate("a dog barking", seed=3, steps=2, fused=False)
    streamed = np.concatenate(list(eng.stream("a dog barking", seed=3, steps=2)))
    assert tf.path == "fused" and th.path == "host"
    assert fused.shape == (16 * 1024,) and np.isfinite(fused).all()
    scale = float(np.abs(host).max())
    np.testing.assert_allclose(fused, host, atol=1e-3 * scale)
    np.testing.assert_array_equal(streamed, host)


def test_mel_variations_decode_side_by_side_and_equal_single_takes(tiny_mel_bundle):
    """With 2 threads a batch's takes decode on a pool, one per thread; they still leave in seed order and equal
    their single renders, and a caller that stops reading leaves nothing running."""
    from soundctm_rt.engine import Engine

    eng = Engine(tiny_mel_bundle, threads=2, warmup=False)
    takes = list(eng.generate_variations("a dog barking", 5, seed=3, steps=2, batch=3))
    assert [t.seed for t in takes] == [3, 4, 5, 6, 7]
    assert eng._pool is not None  # the takes went through the pool
    for t in takes:
        ref, _ = eng.generate("a dog barking", seed=t.seed, steps=2)
        np.testing.assert_allclose(t.audio, ref, atol=1e-5 * float(np.abs(ref).max()))
    gen = eng.generate_variations("a dog barking", 8, seed=0, steps=1, batch=8)
    assert next(gen).seed == 0
    gen.close()  # the other seven are cancelled or already done
    eng._pool.shutdown(wait=True)
    one = Engine(tiny_mel_bundle, threads=1, warmup=False)
    assert [t.seed for t in one.generate_variations("rain", 2, steps=1)] == [0, 1] and one._pool is None


def test_decoder_iterations_are_a_runtime_setting(tiny_mel_bundle, tmp_path):
    from soundctm_rt.engine import Engine

    default = Engine(tiny_mel_bundle, warmup=False)
    assert default.mel_decoder is not None and default.mel_decoder.cfg.iterations == 3  # the bundle's
    more = Engine(tiny_mel_bundle, warmup=False, decoder_iterations=12)
    assert more.mel_decoder is not None and more.mel_decoder.cfg.iterations == 12
    a, _ = default.generate("rain", seed=1, steps=1)
    b, _ = more.generate("rain", seed=1, steps=1)
    assert a.shape == b.shape and not np.allclose(a, b)  # same code, another phase estimate
    run = [sys.executable, "-m", "soundctm_rt", "generate", "rain", "--bundle", str(tiny_mel_bundle)]
    ok = subprocess.run([*run, "-o", str(tmp_path / "a.wav"), "--decoder-iterations", "12"], capture_output=True)
    assert ok.returncode == 0 and (tmp_path / "a.wav").exists(), ok.stderr
    bad = subprocess.run([*run, "-o", str(tmp_path / "b.wav"), "--decoder-iterations", "-1"], capture_output=True)
    assert bad.returncode == 2 and b"decoder-iterations" in bad.stderr


def test_mel_bundle_without_its_code_is_refused(tiny_mel_bundle, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_mel_bundle, bad)
    m = json.loads((bad / "manifest.json").read_text())
    del m["latent"]["mel"]
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="lacks"):
        Bundle.open(bad)
    m["latent"]["mel"] = {"n_mels": 32}
    m["latent"]["std"] = m["latent"]["std"][:5]
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="do not match"):
        Bundle.open(bad)


def test_soft_limit_never_reaches_full_scale_and_keeps_quiet_samples():
    from soundctm_rt.level import soft_limit

    x = np.linspace(-3, 3, 6001, dtype=np.float32)
    y = soft_limit(x.copy())
    assert np.abs(y).max() <= 0.999
    quiet = np.abs(x) <= 0.9
    np.testing.assert_array_equal(y[quiet], x[quiet])
    assert (np.diff(y) >= 0).all()  # monotonic: no fold-over distortion


def test_level_normalisation_sets_the_predicted_peak_from_the_code():
    """A gain on the audio is a constant on the code: the prediction follows it exactly, so any input level
    comes out at the same decoded peak; a decoded peak lands near the target; silence is not raised 70 dB."""
    from soundctm_rt.level import MAX_BOOST_DB, TARGET_PEAK_DBFS, level_shift, normalise_level, predicted_peak_dbfs

    cfg = MelCodeConfig()
    dec = MelDecoder(cfg)
    w = _signals(64 * cfg.hop)[:2]  # the tone and the noise burst
    z = log_mel(w, cfg)
    p0 = predicted_peak_dbfs(dec, z)
    p1 = predicted_peak_dbfs(dec, z + np.float32(math.log(10)))  # x10 in magnitude: +20 dB
    np.testing.assert_allclose(p1 - p0, 20.0, atol=1e-3)
    outs = []
    for g in (0.1, 1.0, 8.0):  # -20 dB to +18 dB: the teacher's loudest takes were +31 dBFS
        zn = normalise_level(dec, log_mel(g * w, cfg))
        np.testing.assert_allclose(predicted_peak_dbfs(dec, zn), TARGET_PEAK_DBFS, atol=0.05)
        outs.append(dec.decode(zn))
    peaks = 20 * np.log10(np.abs(np.stack(outs)).max(-1))
    assert np.ptp(peaks, axis=0).max() < 0.5, peaks  # the same take whatever the level the model made
    assert (np.abs(peaks - TARGET_PEAK_DBFS) < 6.0).all(), peaks  # the predictor's error: ~3 dB per sd
    silence = np.full((1, cfg.n_mels, 64), math.log(cfg.log_floor), np.float32)
    np.testing.assert_allclose(level_shift(dec, silence), MAX_BOOST_DB * math.log(10) / 20, rtol=1e-6)


def test_engine_level_setting_is_one_gain_for_every_path(tiny_mel_bundle):
    """normalise_level scales a take's decode by one gain, and the streamed and generated takes get the same."""
    from soundctm_rt.engine import Engine
    from soundctm_rt.level import soft_limit

    raw = Engine(tiny_mel_bundle, normalise_level=False)
    eng = Engine(tiny_mel_bundle)
    x = eng.sample_latent("a dog barking", seed=5, steps=1)
    a, b = raw.decode(x), eng.decode(x)  # before the limiter
    g = float(np.dot(a, b) / np.dot(a, a))
    assert abs(20 * math.log10(g)) > 0.1  # a random model's take is not at -1 dBFS already
    np.testing.assert_allclose(b, g * a, atol=1e-3 * np.abs(b).max())  # one gain over the whole take
    take, _ = eng.generate("a dog barking", seed=5, steps=1, fused=False)
    np.testing.assert_array_equal(take, soft_limit(b.copy()))
    np.testing.assert_array_equal(np.concatenate(list(eng.stream("a dog barking", seed=5, steps=1))), take)
