"""`soundctm-rt serve` as a process: clean stop on SIGINT/SIGTERM, one clear message without an audio device,
refusal to bind wide without an allowlist."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from soundctm_rt.bench.process import read_rest, wait_for_line
from soundctm_rt.daemon.client import OscClient


def _serve(bundle, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "soundctm_rt", "serve", "--bundle", str(bundle), "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_cleanly(tiny_bundle, tmp_path, sig) -> None:
    import soundfile as sf

    p = _serve(tiny_bundle, "--output", str(tmp_path / "out.wav"))
    try:
        line = wait_for_line(p, "listening on 127.0.0.1:", 120)
        port = int(line.strip().rsplit(":", 1)[1])
        with OscClient(port) as c:
            c.send("/soundctm/generate", "a long hum", 1)  # busy while the signal arrives
            c.expect("/soundctm/ack")
        p.send_signal(sig)
        p.wait(timeout=30)  # a guard against a hang, not a speed check: it exits by itself, never killed
        assert p.returncode == 0, read_rest(p)
        assert sf.info(str(tmp_path / "out.wav")).frames > 0  # the sink was closed: the header was written
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_no_audio_device_gives_one_clear_message(tiny_bundle) -> None:
    env = {**os.environ, "JACK_NO_START_SERVER": "1", "JACK_DEFAULT_SERVER": "soundctm-none-here"}
    p = _serve(tiny_bundle, env=env)
    out, _ = p.communicate(timeout=60)
    if p.returncode == 0:
        pytest.skip("this machine has an audio device")
    assert p.returncode == 1  # a failure, not a wrong command line (README "Exit codes")
    assert "no audio output device" in out and "--output" in out and "--no-audio" in out
    assert "Traceback" not in out


def test_wide_bind_needs_allowlist(tiny_bundle) -> None:
    p = _serve(tiny_bundle, "--no-audio", "--host", "0.0.0.0")
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 2 and "--allow" in out


def _serve_fails(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "soundctm_rt", "serve", "--no-audio", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_busy_port_is_reported_before_the_model_loads(tmp_path) -> None:
    import socket

    held = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    held.bind(("127.0.0.1", 0))
    try:
        port = held.getsockname()[1]
        # a bundle that does not exist: the port must be the first thing checked
        r = _serve_fails("--port", str(port), "--bundle", str(tmp_path / "missing"))
    finally:
        held.close()
    assert r.returncode == 1, r.stderr
    assert f"UDP port {port} on 127.0.0.1 is already in use" in r.stderr and "--port" in r.stderr, r.stderr
    assert "missing" not in r.stderr and "Traceback" not in r.stderr


def test_ipv6_host_and_open_allowlist(tmp_path) -> None:
    r = _serve_fails("--host", "::1", "--port", "0", "--bundle", str(tmp_path / "missing"))
    if "cannot bind" in r.stderr or "cannot resolve" in r.stderr:
        pytest.skip(f"no IPv6 loopback here: {r.stderr.strip()}")
    assert r.returncode == 1 and "missing" in r.stderr and "--host" not in r.stderr, r.stderr  # got past binding
    r = _serve_fails("--host", "0.0.0.0", "--port", "0", "--allow", "0.0.0.0/0", "--bundle", str(tmp_path / "x"))
    assert "warning: --allow 0.0.0.0/0 lets every address on the internet" in r.stderr, r.stderr
