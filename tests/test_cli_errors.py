"""What the command line says when something is wrong: one `error:` line, no traceback, and the exit code that
tells a script which kind of wrong (README "Exit codes": 1 a failure, 2 a wrong command line)."""

from __future__ import annotations

import json
import queue
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from soundctm_rt.cli import app
from soundctm_rt.daemon import addresses as A

LONG_PROMPT = "a heavy metal door slams shut in a long stone corridor while rain falls and thunder rolls far away"


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def error_lines(r) -> list[str]:
    return [ln for ln in r.stderr.splitlines() if ln.strip()]


def assert_one_error(r, code: int, *words: str) -> None:
    """Exit `code`, one line on stderr naming `words`, no exception escaping the command."""
    assert r.exit_code == code, (r.exit_code, r.output)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    lines = error_lines(r)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture
def edited_bundle(tiny_bundle, tmp_path):
    """A copy of the tiny bundle and a function that rewrites its manifest (manifest.json is not hashed)."""
    root = tmp_path / "b"
    shutil.copytree(tiny_bundle, root)

    def edit(change) -> Path:
        m = json.loads((root / "manifest.json").read_text())
        (root / "manifest.json").write_text(json.dumps(change(m)))
        return root

    return edit


@pytest.fixture
def no_generation(monkeypatch):
    """Engine.generate replaced by a recorder: the calls that would have generated."""
    from soundctm_rt.engine import Engine

    calls: list[str] = []
    monkeypatch.setattr(Engine, "generate", lambda self, prompt, **kw: calls.append(prompt))
    return calls


# ---- the manifest: malformed, or naming a graph it does not verify --------------------------------------------


def test_info_and_generate_on_a_list_manifest_fail_in_one_line(edited_bundle, tmp_path):
    root = edited_bundle(lambda m: [])
    assert_one_error(invoke("info", root), 1, "not a soundctm-rt manifest")
    assert_one_error(invoke("generate", "x", "-o", tmp_path / "x.wav", "--bundle", root), 1, "manifest")


def test_a_file_entry_without_bytes_fails_in_one_line(edited_bundle):
    def drop(m):
        del m["files"]["tokenizer.json"]["bytes"]
        return m

    assert_one_error(invoke("info", edited_bundle(drop)), 1, "'files.tokenizer.json' lacks 'bytes'", "re-export")


def test_generate_refuses_a_bundle_whose_graph_lost_its_file_before_generating(edited_bundle, tmp_path):
    def drop_student_step(m):
        rel = m["graphs"]["student_step"]["files"]["onnxruntime"]
        del m["files"][rel]
        (tmp_path / "b" / rel).unlink()
        return m

    root = edited_bundle(drop_student_step)
    r = invoke("generate", "rain", "--steps", 3, "-o", tmp_path / "x.wav", "--bundle", root)
    assert_one_error(r, 1, "graph 'student_step'", "re-export")
    assert not (tmp_path / "x.wav").exists()


# ---- the output path: checked before any work ---------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_output_in_proc_fails_before_generating(tiny_bundle, no_generation):
    r = invoke("generate", "rain", "-o", "/proc/x.wav", "--bundle", tiny_bundle)
    assert_one_error(r, 1, "cannot write /proc/x.wav")
    assert no_generation == []


def test_output_below_a_file_fails_before_generating(tiny_bundle, tmp_path, no_generation):
    (tmp_path / "existing_file.wav").write_bytes(b"RIFF")
    target = tmp_path / "existing_file.wav" / "x.wav"
    r = invoke("generate", "rain", "-o", target, "--bundle", tiny_bundle)
    assert_one_error(r, 1, f"cannot write {target}", "is a file, not a folder")
    r = invoke("generate", "rain", "-o", target.parent / "sub" / "y.wav", "--bundle", tiny_bundle)
    assert_one_error(r, 1, "is a file, not a folder")
    assert no_generation == [] and (tmp_path / "existing_file.wav").read_bytes() == b"RIFF"


def test_output_that_is_a_folder_fails_before_generating(tiny_bundle, tmp_path, no_generation):
    (tmp_path / "take.wav").mkdir()
    r = invoke("generate", "rain", "-o", tmp_path / "take.wav", "--bundle", tiny_bundle)
    assert_one_error(r, 1, "it is a folder")
    assert no_generation == []


# ---- one validation for the CLI and the daemon ----------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["", "a\x07b", "rain\nthunder", "x" * 10_000])
def test_generate_refuses_the_prompts_the_daemon_refuses_with_its_words(tiny_bundle, tmp_path, prompt, no_generation):
    with pytest.raises(A.Refusal) as refused:
        A.parse("/soundctm/generate", (prompt,))
    r = invoke("generate", prompt, "-o", tmp_path / "x.wav", "--bundle", tiny_bundle)
    assert_one_error(r, 2, f"error: {refused.value}")
    assert no_generation == []


def test_generate_refuses_a_duration_the_daemon_refuses(tiny_bundle, tmp_path, no_generation):
    with pytest.raises(A.Refusal, match="duration"):
        A.parse("/soundctm/generate", ("rain", 0, 1, 0.0, 3.0, 0.0001))
    r = invoke("generate", "rain", "--duration", 0.0001, "-o", tmp_path / "x.wav", "--bundle", tiny_bundle)
    assert_one_error(r, 2, "duration must be in [0.01, ")
    assert no_generation == []


def test_generate_warns_when_the_prompt_is_cut(tiny_bundle, tmp_path):
    r = invoke("generate", LONG_PROMPT, "-o", tmp_path / "x.wav", "--bundle", tiny_bundle, "--threads", 1)
    assert r.exit_code == 0, r.output
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 1 and "prompt cut to the text encoder's 16 tokens" in warnings[0]
    assert (tmp_path / "x.wav").is_file()


def test_daemon_sends_the_cut_prompt_in_warn(tiny_engine):
    from soundctm_rt.daemon.worker import Job, TakeCache, Worker

    sent: list[tuple] = []
    worker = Worker(
        engine=tiny_engine,
        jobs=queue.Queue(),
        mixer=None,
        device_rate=44100,
        cache=TakeCache(),
        reply=lambda client, address, *args: sent.append((address, *args)),
    )
    worker.warn_if_far(Job(7, "generate", 0.0, ("127.0.0.1", 9), LONG_PROMPT))
    worker.warn_if_far(Job(8, "generate", 0.0, ("127.0.0.1", 9), "rain"))
    assert len(sent) == 1 and sent[0][:2] == ("/soundctm/warn", 7)
    assert sent[0][2] == tiny_engine.truncation_warning(LONG_PROMPT)


# ---- exit codes: 1 for a failure, 2 for a wrong command line ---------------------------------------------------


def test_runtime_failures_exit_1(tmp_path):
    missing = tmp_path / "nothing"
    assert_one_error(invoke("generate", "x", "-o", tmp_path / "x.wav", "--bundle", missing), 1, "does not exist")
    assert_one_error(invoke("info", missing), 1, "does not exist")
    interval = sys.getswitchinterval()
    try:
        assert_one_error(invoke("serve", "--no-audio", "--port", 0, "--bundle", missing), 1, "does not exist")
    finally:
        sys.setswitchinterval(interval)  # serve shortens it for its audio thread


def test_bench_failure_exits_1(tmp_path):
    r = invoke("bench", "--bundle", tmp_path / "nothing", "--no-torch", "--steps", 1, "--runs", 1, "--warmup", 0)
    assert_one_error(r, 1, "does not exist")


@pytest.mark.parametrize(
    "args",
    [
        ["generate"],  # typer: missing argument
        ["generate", "x", "--variations", "0"],  # typer: out of range
        ["generate", "x", "--subtype", "MP3"],  # ours, before any work
        ["info", "--bogus"],
        ["serve", "--port", "70000"],
        ["serve", "--no-audio", "--output", "x.wav"],
        ["bench", "--steps", "a"],
    ],
)
def test_usage_errors_exit_2(args):
    assert invoke(*args).exit_code == 2
