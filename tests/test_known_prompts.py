"""Known prompts: exported with the captions, sha256-listed, calibrated; the runtime warns on far prompts (engine,
`generate`, `info`, the daemon's /soundctm/warn) and bundles without them keep working."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from soundctm_rt.bundle import MANIFEST, Bundle, write_manifest
from soundctm_rt.known_prompts import KnownPrompts

CAPTIONS = (
    "Roland TR-808 kick drum",
    "Roland TR-808 snare drum",
    "Roland TR-909 closed hi-hat",
    "LinnDrum clap",
    "Oberheim DMX tom",
    "E-mu SP-1200 rimshot",
    "a dog barking",
    "a rooster crowing",
    "rain falling on a roof",
    "sea waves crashing",
    "a crackling fire",
    "a clock ticking",
    "a dog barking",  # a duplicate: listed once
)
CORPORA = ("drum-machines",) * 6 + ("esc10",) * 7


@pytest.fixture(scope="module")
def known_bundle(tmp_path_factory, tiny_source) -> Path:
    from soundctm_rt.export.pipeline import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("known") / "b"
    opts = ExportOptions(steps=(1,), openvino=False, captions=CAPTIONS, caption_corpora=CORPORA)
    return export_bundle(tiny_source, out, opts)


def _rewrite(bundle: Path, dest: Path, edit) -> Path:
    """A copy of the bundle with its manifest edited (manifest.json itself is not hashed)."""
    shutil.copytree(bundle, dest)
    m = json.loads((dest / MANIFEST).read_text())
    edit(dest, m)
    write_manifest(dest, m)
    return dest


@pytest.fixture(scope="module")
def far_bundle(known_bundle, tmp_path_factory) -> Path:
    """Every prompt is far: the threshold above any cosine."""

    def edit(_root: Path, m: dict) -> None:
        m["known_prompts"]["threshold"] = 1.01

    return _rewrite(known_bundle, tmp_path_factory.mktemp("far") / "b", edit)


def test_files_are_written_and_listed(known_bundle) -> None:
    m = Bundle.open(known_bundle).manifest  # verifies every sha256
    sec = m["known_prompts"]
    assert sec["file"] in m["files"] and sec["embeddings"] in m["files"]
    distinct = sorted(set(CAPTIONS))
    assert sec["count"] == len(distinct)
    doc = json.loads((known_bundle / sec["file"]).read_text())
    assert doc["captions"] == distinct
    assert doc["corpora"] == {"drum-machines": 6, "esc10": 6}
    assert doc["threshold"] == sec["threshold"]
    cal = doc["calibration"]
    assert cal["held_out"]["count"] == round(0.2 * len(distinct)) and cal["held_out"]["fraction"] == 0.2
    assert cal["unrelated"]["count"] >= 30
    for side in ("held_out", "unrelated"):
        assert set(cal[side]["percentiles"]) == {"p5", "p25", "p50", "p75", "p95"}
    assert 0 <= cal["false_warning_rate"] <= 1 and 0 <= cal["miss_rate"] <= 1 and cal["rule"]
    emb = np.load(known_bundle / sec["embeddings"])
    assert emb.dtype == np.float16 and emb.shape == (len(distinct), m["text"]["hidden"])
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)


def test_a_known_caption_is_its_own_nearest_and_not_warned(known_bundle) -> None:
    from soundctm_rt.engine import Engine

    eng = Engine(known_bundle, warmup=False)
    known = KnownPrompts.from_bundle(eng.bundle)
    assert known is not None
    for caption in ("Roland TR-808 kick drum", "a crackling fire"):
        (name, cos), *_ = known.nearest(eng.encode_prompt(caption).pooled[0])
        assert name == caption and cos == pytest.approx(1.0, abs=1e-3)
        assert eng.prompt_warning(caption) is None


def test_a_bundle_without_known_prompts_never_warns(known_bundle, tmp_path) -> None:
    from soundctm_rt.engine import Engine

    def edit(root: Path, m: dict) -> None:  # a bundle exported before known prompts existed
        sec = m.pop("known_prompts")
        for rel in (sec["file"], sec["embeddings"]):
            m["extra_files"].remove(rel)
            (root / rel).unlink()

    old = _rewrite(known_bundle, tmp_path / "old", edit)
    eng = Engine(old, warmup=False)
    assert KnownPrompts.from_bundle(eng.bundle) is None
    assert eng.prompt_warning("the stock market fell today") is None


def test_check_names_the_three_nearest() -> None:
    emb = np.eye(4, dtype=np.float32)
    known = KnownPrompts(["a", "b", "c", "d"], emb, threshold=0.8)
    assert known.check(np.array([0.0, 0.0, 2.0, 0.0])) is None  # cosine 1 to "c"
    w = known.check(np.array([0.6, 0.5, 0.3, 0.0]), prompt="far away")
    assert w is not None and [c for c, _ in w.nearest] == ["a", "b", "c"]
    assert w.cosine == pytest.approx(w.nearest[0][1]) and w.cosine < 0.8
    assert "'far away'" in w.message and "'a'" in w.message and "\n" not in w.message
    assert known.examples(2) == ["a", "d"]


def test_calibration_rule() -> None:
    from soundctm_rt.export.known_prompts import calibrate, held_out_split

    held, unrelated = np.linspace(0.7, 0.9, 21), np.linspace(0.2, 0.5, 21)
    t, rec = calibrate(held, unrelated)
    assert t == pytest.approx((np.percentile(held, 5) + np.percentile(unrelated, 95)) / 2, abs=1e-5)
    assert rec["false_warning_rate"] == 0 and rec["miss_rate"] == 0
    t, rec = calibrate(held - 0.3, unrelated)  # overlapping: the held-out p5
    assert t == pytest.approx(np.percentile(held - 0.3, 5), abs=1e-5) and "overlap" in rec["rule"]
    h, k = held_out_split(10)
    assert len(h) == 2 and sorted([*h, *k]) == list(range(10))
    assert np.array_equal(held_out_split(10)[0], h)  # deterministic


def test_caption_corpora_must_match_captions() -> None:
    from soundctm_rt.export.pipeline import ExportOptions

    with pytest.raises(ValueError, match="one corpus per caption"):
        ExportOptions(captions=("a", "b"), caption_corpora=("x",))


def test_generate_cli_warns_on_a_far_prompt(far_bundle, known_bundle, tmp_path) -> None:
    from typer.testing import CliRunner

    from soundctm_rt.cli import app

    args = ["generate", "quarterly tax return", "-o", str(tmp_path / "x.wav"), "--bundle", str(far_bundle)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(lines) == 1 and "nearest known prompts" in lines[0]
    args[-1] = str(known_bundle)
    r = CliRunner().invoke(app, ["generate", "Roland TR-808 kick drum", *args[2:]])
    assert r.exit_code == 0 and "warning:" not in r.stderr


def test_info_lists_known_prompts(known_bundle) -> None:
    from typer.testing import CliRunner

    from soundctm_rt.cli import app

    r = CliRunner().invoke(app, ["info", str(known_bundle)])
    assert r.exit_code == 0, r.output
    assert "known       12 prompts; warns below cosine" in r.stdout
    assert "drum-machines=6, esc10=6" in r.stdout
    lines = r.stdout.splitlines()
    first = next(i for i, ln in enumerate(lines) if ln.startswith("  examples "))
    assert [ln.strip() for ln in lines[first + 1 : first + 12]] == sorted(set(CAPTIONS))[1:]  # 12: all of them
    assert lines[first].endswith(sorted(set(CAPTIONS))[0])


def test_daemon_warns_before_done(far_bundle) -> None:
    from soundctm_rt.daemon.client import OscClient
    from soundctm_rt.daemon.server import Daemon, DaemonConfig
    from soundctm_rt.engine import Engine

    dm = Daemon(Engine(far_bundle, warmup=False), DaemonConfig(port=0, no_audio=True))
    dm.start()
    try:
        with OscClient(dm.address[1]) as c:
            c.send("/soundctm/generate", "quarterly tax return", 1)
            replies = []
            while not replies or replies[-1][0] not in ("/soundctm/done", "/soundctm/fail"):
                replies.append(c.recv(30))
    finally:
        dm.stop()
    (job,) = next(a for addr, a in replies if addr == "/soundctm/ack")
    assert replies[-1][0] == "/soundctm/done" and replies[-1][1][0] == job
    warns = [a for addr, a in replies if addr == "/soundctm/warn"]
    assert len(warns) == 1 and warns[0][0] == job and "nearest known prompts" in warns[0][1]
