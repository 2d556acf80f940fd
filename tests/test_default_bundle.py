"""The shipped default model: inside the package, within its size budget, valid, licensed, and it makes sound."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

MAX_BYTES = 64_000_000  # issue: the shipped bundle is at most 64 MB


@pytest.fixture(scope="module")
def default_bundle():
    from soundctm_rt.bundle import Bundle, default_bundle_path

    path = default_bundle_path()
    assert path is not None, "soundctm_rt/default_bundle/ is missing: the package must ship its default model"
    return Bundle.open(path)  # checks the schema and the sha256 of every file


def test_default_bundle_fits_and_is_complete(default_bundle):
    m = default_bundle.manifest
    total = sum(f["bytes"] for f in m["files"].values())
    on_disk = sum(p.stat().st_size for p in default_bundle.root.rglob("*") if p.is_file())
    assert on_disk <= MAX_BYTES, f"shipped bundle is {on_disk / 1e6:.1f} MB"
    assert total <= on_disk
    assert set(m["fused_steps"]) >= {1, 2, 4, 8}
    for name, g in m["graphs"].items():
        assert set(g["files"]) == {"onnxruntime", "openvino"}, name
    assert m["model"]["provenance"].get("init") != "random", "the shipped model must be trained"
    # the third-party weights inside (the text encoder) travel with their licence
    lic = {x["component"]: x for x in m["licenses"]}
    assert lic["text_encoder"]["license"] == "Apache-2.0"
    assert (default_bundle.root / lic["text_encoder"]["file"]).is_file()


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_default_model_makes_a_sound(default_bundle, backend):
    from soundctm_rt.engine import Engine

    before = sorted(p for p in default_bundle.root.rglob("*"))
    eng = Engine(default_bundle.root, backend=backend)
    audio, _ = eng.generate("Roland TR-808 kick drum", seed=0)  # the bundle's default step count (1)
    # nothing is written into the bundle (installed, it lives in site-packages): caches go to the user's cache
    assert sorted(p for p in default_bundle.root.rglob("*")) == before
    assert eng.sample_rate == 44100
    assert np.all(np.isfinite(audio))
    rms = float(np.sqrt(np.mean(audio**2)))
    assert rms > 1e-3, f"the default model wrote near-silence (rms {rms:.2e})"


def test_generate_without_bundle_uses_the_default_model(tmp_path):
    """The README's first command, minus the install: no --bundle, a WAV at 44.1 kHz that is not silence."""
    import soundfile as sf

    out = tmp_path / "kick.wav"
    r = subprocess.run(
        [sys.executable, "-m", "soundctm_rt", "generate", "Roland TR-808 kick drum", "-o", str(out), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    audio, sr = sf.read(out)
    assert sr == 44100 and len(audio) > 0.5 * sr
    assert float(np.abs(audio).max()) > 1e-2
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert rec["rtf"] > 0
