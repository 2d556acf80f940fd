"""The command line as a user runs it: real processes, real files."""

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

CLI = [sys.executable, "-m", "soundctm_rt"]


def run(*args, timeout=600):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def test_generate_writes_a_deterministic_wav(tiny_bundle, tmp_path):
    out = tmp_path / "kick.wav"
    r = run("generate", "Roland TR-808 kick drum", "-o", out, "--bundle", tiny_bundle, "--seed", 3, "--steps", 2)
    assert r.returncode == 0, r.stderr
    audio, sr = sf.read(out)
    assert sr == 44100 and audio.ndim == 1 and len(audio) == 16 * 1024
    assert np.abs(audio).max() > 0
    again = tmp_path / "again.wav"
    assert (
        run(
            "generate",
            "Roland TR-808 kick drum",
            "-o",
            again,
            "--bundle",
            tiny_bundle,
            "--seed",
            3,
            "--steps",
            2,
        ).returncode
        == 0
    )
    assert out.read_bytes() == again.read_bytes()


def test_generate_variations_and_openvino(tiny_bundle, tmp_path):
    r = run(
        "generate",
        "metal door slam",
        "--variations",
        3,
        "-o",
        tmp_path / "sfx",
        "--bundle",
        tiny_bundle,
        "--backend",
        "openvino",
        "--duration",
        0.2,
        "--json",
    )
    assert r.returncode == 0, r.stderr
    files = sorted((tmp_path / "sfx").glob("take_*.wav"))
    assert [f.name for f in files] == ["take_000.wav", "take_001.wav", "take_002.wav"]
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec["seed"] for rec in records] == [0, 1, 2]
    takes = [sf.read(f)[0] for f in files]
    assert all(len(t) == round(0.2 * 44100) for t in takes)
    assert not np.array_equal(takes[0], takes[1])


def test_generate_variations_run_as_one_batch_and_match_single_takes(tiny_bundle, tmp_path):
    """--variations K samples the K takes together (timing says batch K), and take i is the single take of seed
    seed + i to float rounding."""
    common = ["--bundle", tiny_bundle, "--duration", 0.3, "--subtype", "FLOAT", "--json", "--threads", 1]
    r = run("generate", "glass breaking", "--variations", 3, "--seed", 5, "-o", tmp_path / "v", *common)
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(rec["seed"], rec["batch"]) for rec in recs] == [(5, 3), (6, 3), (7, 3)]
    one = run("generate", "glass breaking", "--seed", 6, "-o", tmp_path / "one.wav", *common)
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)["batch"] == 1
    batched, single = sf.read(recs[1]["file"])[0], sf.read(tmp_path / "one.wav")[0]
    assert np.abs(single).max() > 0 and np.allclose(batched, single, atol=1e-4)


def test_generate_int8_needs_an_int8_bundle(tiny_bundle, tmp_path):
    r = run("generate", "rain", "--int8", "-o", tmp_path / "r.wav", "--bundle", tiny_bundle)
    assert r.returncode == 1 and "re-export it with --int8" in r.stderr and "Traceback" not in r.stderr


def test_generate_peak_db_normalises_each_take(tiny_bundle, tmp_path):
    r = run("generate", "a dog barking", "-o", tmp_path / "d", "--bundle", tiny_bundle, "--variations", 2,
            "--peak-db", -6, "--subtype", "FLOAT", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    for rec in recs:
        audio, _ = sf.read(rec["file"])
        assert 20 * np.log10(np.abs(audio).max()) == pytest.approx(-6.0, abs=1e-3)
        assert np.isfinite(rec["gain_db"])


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--steps", "0"], "steps"),
        (["--gamma", "2"], "gamma"),
        (["--cfg", "nan"], "finite"),
        (["--duration", "60"], "duration"),
        (["-o", "x.mp3"], ".wav"),
        (["--backend", "tensorrt"], "backend"),
        (["--peak-db", "3"], "--peak-db"),
        (["--intensity", "fade-in"], "--intensity"),  # torch-side: `soundctm-rt control generate`
    ],
)
def test_generate_bad_arguments(tiny_bundle, tmp_path, args, msg):
    base = ["generate", "x", "--bundle", tiny_bundle]
    if "-o" not in args:
        base += ["-o", tmp_path / "x.wav"]
    r = run(*base, *args)
    assert r.returncode == 2
    assert msg in r.stderr and "Traceback" not in r.stderr


def test_generate_missing_bundle_is_a_clear_error(tmp_path):
    r = run("generate", "x", "-o", tmp_path / "x.wav", "--bundle", tmp_path / "nothing")
    assert r.returncode == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_info(tiny_bundle):
    r = run("info", tiny_bundle)
    assert r.returncode == 0, r.stderr
    for word in ("fused_2", "vae_decoder_stream", "parity vs torch", "44100 Hz", "omega trained on"):
        assert word in r.stdout
    r = run("info", tiny_bundle, "--json")
    assert json.loads(r.stdout)["schema"] == "soundctm-rt-bundle"


def test_export_argument_errors(tmp_path):
    r = run("export", "-o", tmp_path / "b")
    assert r.returncode == 2 and "CHECKPOINT or --init random" in r.stderr
    r = run("export", "--init", "random", "--config", "nonexistent", "-o", tmp_path / "b")
    assert r.returncode == 1 and "unknown config" in r.stderr
    r = run("export", tmp_path / "missing.safetensors", "-o", tmp_path / "b")
    assert r.returncode == 1 and "does not exist" in r.stderr


@pytest.mark.slow
def test_export_from_checkpoint_matches_random_init(tiny_source, tmp_path):
    """A saved checkpoint exports through the same path; fp16 weights stay within the parity gate."""
    from soundctm_rt.train.checkpoint import save_model_checkpoint

    ckpt = save_model_checkpoint(tmp_path / "model.safetensors", tiny_source)
    r = run("export", ckpt, "-o", tmp_path / "b", "--steps", "1", "--no-openvino", "--int8")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    # The INT8 variant covers the graphs that sampling repeats: the step and the fused 1-step graph.
    assert m["fused_steps"] == [1] and set(m["int8"]) == {"student_step", "fused_1"}
    for name in ("student_step", "fused_1"):
        quality = m["int8"][name]["quality"]
        assert quality and all(v > 10 for k, v in quality.items() if k.endswith("_snr_db")), (name, quality)
    from soundctm_rt.engine import Engine

    a, _ = Engine(tmp_path / "b", int8=True).generate("x", steps=2)
    assert np.isfinite(a).all()
    r = run("generate", "x", "--int8", "--steps", 1, "-o", tmp_path / "x.wav", "--bundle", tmp_path / "b", "--json")
    assert r.returncode == 0, r.stderr and (tmp_path / "x.wav").exists()


def test_generate_loads_the_model_before_timing_a_take(tiny_bundle, tmp_path, monkeypatch):
    """The graphs a take runs are open before its clock starts; the load is reported on its own line."""
    from typer.testing import CliRunner

    from soundctm_rt.cli import app
    from soundctm_rt.engine import Engine

    open_at_call: list[set[str]] = []
    for name in ("generate", "generate_variations"):  # whichever the command calls
        real = getattr(Engine, name, None)
        if real is not None:

            def recording(self, *a, _real=real, **kw):
                open_at_call.append(set(self._sessions))
                return _real(self, *a, **kw)

            monkeypatch.setattr(Engine, name, recording)
    args = ["generate", "rain", "-o", str(tmp_path / "r.wav"), "--bundle", str(tiny_bundle), "--threads", "1"]
    for steps, graphs in (("1", {"text_encoder", "fused_1"}), ("3", {"text_encoder", "student_step"})):
        open_at_call.clear()
        r = CliRunner().invoke(app, [*args, "--steps", steps, "--json"])
        assert r.exit_code == 0, r.output
        assert open_at_call and all(graphs <= g for g in open_at_call), open_at_call
        loaded = [ln for ln in r.stderr.splitlines() if ln.startswith("loaded ")]
        assert len(loaded) == 1 and loaded[0].endswith(" ms") and "on onnxruntime (cpu)" in loaded[0]
        assert [json.loads(ln)["seed"] for ln in r.stdout.splitlines()] == [0]


def test_one_logging_policy(tiny_bundle):
    """The root callback sets the level (-q errors only, -v one level more, progress for train and eval); no
    command configures logging itself."""
    import logging
    import re
    from pathlib import Path

    from typer.testing import CliRunner

    from soundctm_rt.cli import app

    ours = logging.getLogger("soundctm_rt")
    cases = [
        (["info", str(tiny_bundle)], logging.WARNING),
        (["-q", "info", str(tiny_bundle)], logging.ERROR),
        (["-v", "info", str(tiny_bundle)], logging.INFO),
        (["eval", "--help"], logging.INFO),
        (["-v", "train", "--help"], logging.DEBUG),
    ]
    before = ours.level
    try:
        for args, level in cases:
            r = CliRunner().invoke(app, args)
            assert r.exit_code == 0 and ours.level == level, (args, r.output, ours.level)
        assert CliRunner().invoke(app, ["-q", "-v", "info", str(tiny_bundle)]).exit_code == 2
    finally:
        from soundctm_rt.logs import StderrHandler

        ours.setLevel(before)
        for h in [h for h in logging.getLogger().handlers if isinstance(h, StderrHandler)]:
            logging.getLogger().removeHandler(h)
    repo = Path(__file__).resolve().parent.parent
    callers = [
        str(p.relative_to(repo))
        for folder in ("soundctm_rt", "train", "export", "bench")
        for p in (repo / folder).rglob("*.py")
        if re.search(r"logging\.basicConfig\(", p.read_text())
    ]
    assert callers == [], callers


def test_task_bar_follows_the_logging_policy(monkeypatch, caplog):
    """Export and bench show a bar unless -q; without tqdm (a runtime-only install) a line per tenth."""
    import builtins
    import logging

    from soundctm_rt.logs import task_bar

    log = logging.getLogger("soundctm_rt.test_bar")
    log.setLevel(logging.WARNING)
    bar = task_bar(20, "bench", log, logging.WARNING)
    assert type(bar).__name__ == "tqdm"
    bar.close()
    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name == "tqdm":
            raise ImportError("no tqdm")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    with (
        caplog.at_level(logging.WARNING, logger="soundctm_rt.test_bar"),
        task_bar(20, "bench", log, logging.WARNING) as b,
    ):
        for _ in range(20):
            b.update()
    assert [r.getMessage() for r in caplog.records].count("bench: 20/20") == 1 and len(caplog.records) == 10
    caplog.clear()
    log.setLevel(logging.ERROR)  # -q
    with task_bar(20, "bench", log, logging.WARNING) as b:
        b.update(20)
    assert caplog.records == []
