"""The shipped client examples against a live daemon: liblo's oscsend/oscdump, the Pure Data patch run headless,
the SuperCollider script run by sclang, and the messages of the Max patch (Max itself does not run here)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from soundctm_rt.bench.process import pending_output, serve_process, stop_process, wait_for_line, wait_for_lines
from soundctm_rt.daemon.client import OscClient

pytestmark = pytest.mark.realtime
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _need(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed (apt-get install {package})")


@pytest.fixture(scope="module")
def live(tiny_bundle):
    """A --no-audio daemon that also sends every reply to a fixed reply port (like Max's setup)."""
    reply_port = _free_port()
    args = ["--bundle", str(tiny_bundle), "--no-audio", "--reply-port", str(reply_port)]
    with serve_process(args) as (port, daemon):
        yield port, reply_port, daemon


@pytest.fixture(scope="module")
def live_audio(tiny_bundle, tmp_path_factory):
    """A daemon with a software audio clock (--output FILE.wav, no sound card needed): time tags take effect."""
    wav = tmp_path_factory.mktemp("examples") / "session.wav"
    with serve_process(["--bundle", str(tiny_bundle), "--output", str(wav)]) as (port, _):
        yield port


def _read_until(proc: subprocess.Popen, needle: str, timeout: float) -> str:
    try:
        return wait_for_line(proc, needle, timeout)
    finally:
        stop_process(proc)


def test_oscsend_and_oscdump(live) -> None:
    _need("oscsend", "liblo-tools")
    port, reply_port, _ = live
    dump = subprocess.Popen(
        ["oscdump", "-L", str(reply_port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        time.sleep(0.3)
        subprocess.run(["oscsend", "127.0.0.1", str(port), "/soundctm/ping"], check=True)
        subprocess.run(
            ["oscsend", "127.0.0.1", str(port), "/soundctm/generate", "sii", "gritty 808 snare", "7", "1"], check=True
        )
        subprocess.run(["oscsend", "127.0.0.1", str(port), "/soundctm/generate", "sf", "x", "nan"], check=True)
        wait_for_line(dump, "/soundctm/pong", 10)
        wait_for_line(dump, "/soundctm/ack", 10)
        # the valid request runs while the invalid one is parsed: its /done may come before or after the /fail
        got = wait_for_lines(dump, ("/soundctm/fail", "/soundctm/done"), 30)
        fail, done = got["/soundctm/fail"], got["/soundctm/done"]
        assert "finite" in fail
        parts = done.split()
        assert parts[parts.index("/soundctm/done") + 1] == "iffff", done
    finally:
        stop_process(dump)


def test_pure_data_patch(live) -> None:
    _need("pd", "puredata")
    port, reply_port, daemon = live
    # netsend's socket does not read replies: the patch listens on the daemon's --reply-port instead
    pd = subprocess.Popen(
        [
            "pd",
            "-nogui",
            "-noaudio",
            "-nomidi",
            "-stderr",
            "-open",
            str(EXAMPLES / "soundctm.pd"),
            "-send",
            f"soundctm-connect connect localhost {port}",
            "-send",
            f"soundctm-listen listen {reply_port}",
            "-send",
            "soundctm ping",
            "-send",
            "soundctm generate gritty 808 snare 7 1",
            "-send",
            "soundctm generate bad -5",
            "-send",
            "soundctm set latency 50",  # the patch's constant-latency message
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # the patch sends everything at once: the replies of the valid generation may cross the others
        replies = ("pong", "ack", "fail", "done")
        try:
            got = wait_for_lines(pd, tuple(f"soundctm-reply: soundctm {r}" for r in replies), 30)
        except TimeoutError as e:  # say what the daemon saw
            raise TimeoutError(f"{e}\n--- the daemon's log:\n{pending_output(daemon)}") from None
        fail, done = got["soundctm-reply: soundctm fail"], got["soundctm-reply: soundctm done"]
        assert "generate" in fail and "range" in fail
        assert float(done.split()[4]) > 0  # latency_ms
    finally:
        stop_process(pd)


def test_supercollider_script(live_audio) -> None:
    """The script sends time-tagged bundles (and one already late) to a daemon with an audio clock."""
    _need("sclang", "supercollider-language")
    port = live_audio
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "QTWEBENGINE_DISABLE_SANDBOX": "1"}
    r = subprocess.run(
        ["sclang", str(EXAMPLES / "soundctm.scd"), str(port)], capture_output=True, text=True, timeout=90, env=env
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "pong" in out and out.count("done id") >= 7 and "\nfail " not in out, out[-3000:]
    assert out.count("late id") == 1, out[-3000:]  # the bundle tagged 50 ms in the past, and only that one


def _max_messages() -> list[list[object]]:
    """The message boxes of the Max patch, typed as Max types them: int, float (with a dot), symbol."""
    pat = json.loads((EXAMPLES / "soundctm.maxpat").read_text())
    msgs = []
    for b in pat["patcher"]["boxes"]:
        box = b["box"]
        if box["maxclass"] != "message":
            continue
        import shlex

        atoms: list[object] = []
        for tok in shlex.split(box["text"]):
            try:
                atoms.append(int(tok))
            except ValueError:
                try:
                    atoms.append(float(tok))
                except ValueError:
                    atoms.append(tok)
        msgs.append(atoms)
    return msgs


def test_max_patch_messages(live) -> None:
    port, reply_port, _ = live
    msgs = _max_messages()
    assert {m[0] for m in msgs} >= {"/soundctm/generate", "/soundctm/preload", "/soundctm/trigger", "/soundctm/stop"}
    with OscClient(port) as c, OscClient(0, bind_port=reply_port) as replies:
        for m in msgs:
            c.send(str(m[0]), *m[1:])
            # a refusal of the message itself is /fail with 2 arguments; /stop may end earlier jobs (3: with id)
            addr, args = replies.expect(
                ("/soundctm/ack", "/soundctm/pong", "/soundctm/status.reply", "/soundctm/fail"),
                10,
                match=lambda a: len(a) != 3 or a[1] != "stopped",
            )
            assert addr != "/soundctm/fail", (m, args)
