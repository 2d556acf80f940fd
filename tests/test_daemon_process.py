"""`soundctm-rt serve` as a process: clean stop on SIGINT/SIGTERM within 2 s, one clear message without an
audio device, refusal to bind wide without an allowlist."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from soundctm_rt.daemon.client import OscClient
from soundctm_rt.daemon.jack import wait_for_line


def _serve(bundle, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "soundctm_rt", "serve", "--bundle", str(bundle), "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_cleanly_within_2s(tiny_bundle, tmp_path, sig) -> None:
    p = _serve(tiny_bundle, "--output", str(tmp_path / "out.wav"))
    try:
        line = wait_for_line(p, "listening on 127.0.0.1:", 120)
        port = int(line.strip().rsplit(":", 1)[1])
        with OscClient(port) as c:
            c.send("/soundctm/generate", "a long hum", 1)  # busy while the signal arrives
            c.expect("/soundctm/ack")
        t0 = time.monotonic()
        p.send_signal(sig)
        p.wait(timeout=5)
        assert time.monotonic() - t0 < 2.0
        assert p.returncode == 0, p.stdout.read()
        assert (tmp_path / "out.wav").stat().st_size > 44
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
    assert p.returncode == 2
    assert "no audio output device" in out and "--output" in out and "--no-audio" in out
    assert "Traceback" not in out


def test_wide_bind_needs_allowlist(tiny_bundle) -> None:
    p = _serve(tiny_bundle, "--no-audio", "--host", "0.0.0.0")
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 2 and "--allow" in out
