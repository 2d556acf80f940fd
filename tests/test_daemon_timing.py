"""Sample-accurate timing against a live daemon in this process on the software clock (--output FILE.wav): a
time-tagged bundle's voice starts at the file frame whose DAC time is the tag, the constant-latency mode starts
untimed triggers at receipt + latency, late bundles play at once with /late, bundles beyond the horizon are
refused, timed stops fade at their sample, and the voice slots are bounded. The takes are impulses put in the
cache, so a voice's first sample is a file frame that can be read back exactly."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from soundctm_rt.daemon.client import OscClient
from soundctm_rt.daemon.clock import unix_to_ntp
from soundctm_rt.daemon.osc import encode_bundle, encode_message
from soundctm_rt.daemon.server import Daemon, DaemonConfig, open_output

SR = 48000
DONE_OR_FAIL = ("/soundctm/done", "/soundctm/fail")


def bundle(t_unix: float, *messages: bytes) -> bytes:
    """An OSC bundle time-tagged at Unix time t_unix."""
    return encode_bundle(unix_to_ntp(t_unix), *messages)


def trigger(prompt: str = "click") -> bytes:
    return encode_message("/soundctm/trigger", prompt)


class Live:
    def __init__(self, daemon: Daemon, client: OscClient, wav: Path) -> None:
        self.daemon, self.c, self.wav = daemon, client, wav

    def frame_of(self, t_unix: float) -> float:
        """The output frame (fractional) whose DAC time is Unix time t_unix, by the software clock."""
        out = self.daemon.output
        return (self.daemon.wall.to_perf(t_unix) - out.t0) * SR

    def done(self, n: int, timeout: float = 10.0) -> dict[int, tuple[Any, ...]]:
        got: dict[int, tuple[Any, ...]] = {}
        while len(got) < n:
            addr, args = self.c.expect(DONE_OR_FAIL, timeout)
            assert addr == "/soundctm/done", args
            got[args[0]] = args
        return got

    def audio(self) -> np.ndarray:
        """The session file's left channel (stops the daemon: the file is complete once it is closed)."""
        self.daemon.stop()
        x, _ = sf.read(str(self.wav), dtype="float32", always_2d=True)
        return x[:, 0]


@pytest.fixture()
def live(tiny_engine, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Live]:
    kw = getattr(request, "param", {})
    cfg = DaemonConfig(port=0, output=tmp_path / "session.wav", **kw)
    dm = Daemon(tiny_engine, cfg, open_output(cfg))
    click = np.zeros(64, dtype=np.float32)
    click[0] = 0.5
    dm.cache.add("click", click)
    dm.cache.add("tone", np.full(SR, 0.25, dtype=np.float32))  # one second, flat: a fade is easy to read
    dm.start()
    try:
        with OscClient(dm.address[1]) as c:
            yield Live(dm, c, cfg.output)
    finally:
        dm.stop()


def onsets(x: np.ndarray) -> list[int]:
    """Frames where sound starts after silence."""
    nz = np.flatnonzero(x)
    return [int(f) for f in nz[np.r_[True, np.diff(nz) > 64]]] if len(nz) else []


def test_time_tagged_triggers_start_on_their_sample_while_a_generate_runs(live: Live) -> None:
    c = live.c
    c.send("/soundctm/set", "duration", 0.05)
    c.expect("/soundctm/ack")
    c.send("/soundctm/generate", "rain", 3, 1)  # an untimed generate runs while the bundles wait
    t = time.time() + 0.3
    tags = [t, t + 1000 / SR, t + 0.1 + 0.3 / SR]
    for tag in tags:
        c.send_raw(bundle(tag, trigger()))
    done = live.done(4, 30)
    s = live.daemon.status()
    x = live.audio()
    want = [live.frame_of(tag) for tag in tags]
    got = [f for f in onsets(x) if abs(f - want[0]) < 0.2 * SR]  # the clicks (the generate ended before them)
    assert len(got) == 3, (got, want)
    for f, w in zip(got, want, strict=True):
        assert abs(f - w) <= 0.5 + 1e-6, (f, w)  # the frame whose DAC time is the tag
    assert got[1] - got[0] == 1000  # exactly, in the audio itself
    assert s["late"] == 0 and s["scheduled"] == 0
    assert s["schedule_error_max_ms"] <= 1e3 * 0.5 / SR + 1e-6
    assert all(done[i][1] > 250 for i in done if i != min(done))  # receipt to DAC: the bundles' 0.3 s latency


@pytest.mark.parametrize("live", [{"latency_ms": 40.0}], indirect=True)
def test_constant_latency_starts_untimed_triggers_at_receipt_plus_latency(live: Live) -> None:
    c = live.c

    def one() -> float:
        c.send_raw(trigger())
        _, (job,) = c.expect("/soundctm/ack")
        _, args = c.expect("/soundctm/done", 5, match=lambda a: a[0] == job)
        time.sleep(0.013)  # the next arrival at another phase of the block
        return float(args[1])

    lat = [one() for _ in range(8)]
    half_sample_ms = 1e3 * 0.5 / SR
    assert all(abs(ms - 40.0) <= half_sample_ms + 2e-4 for ms in lat), lat  # receipt -> first sample at the DAC
    assert live.daemon.status()["late"] == 0
    c.send("/soundctm/set", "latency", 0)  # back to as soon as possible: the next block
    c.expect("/soundctm/ack")
    assert live.daemon.status()["latency_ms"] == 0.0
    assert one() < 2 * 256 / SR * 1e3 + 15.0


def test_late_bundles_play_at_once_and_are_reported(live: Live) -> None:
    c = live.c
    c.send_raw(bundle(time.time() - 0.05, trigger()))
    _, (job,) = c.expect("/soundctm/ack")
    _, (jid, late_s) = c.expect("/soundctm/late", 5)
    assert jid == job and 0.05 <= late_s < 0.5
    _, args = c.expect("/soundctm/done", 5)
    assert args[0] == job and args[1] < 50  # played at once: within a few blocks of receipt
    assert live.daemon.status()["late"] == 1


def test_a_bundle_beyond_the_horizon_is_refused(live: Live) -> None:
    live.c.send_raw(bundle(time.time() + 30, trigger()))
    addr, args = live.c.expect(("/soundctm/ack", "/soundctm/fail"), 5)
    assert addr == "/soundctm/fail" and args[0] == "trigger" and "too far ahead" in args[1], args
    assert live.daemon.mixer is not None and live.daemon.mixer.active() == 0


def test_timed_stop_fades_from_its_sample_and_a_stop_before_the_start_silences_the_voice(live: Live) -> None:
    c = live.c
    t = time.time() + 0.3
    c.send_raw(bundle(t, trigger("tone")))
    _, (job,) = c.expect("/soundctm/ack")
    c.send_raw(bundle(t + 0.1, encode_message("/soundctm/stop", job)))
    assert c.expect("/soundctm/ack", 5)[1] == (job,)
    c.send_raw(bundle(t + 0.5, trigger("tone")))  # stopped 0.1 s before it would start: never plays
    _, (job2,) = c.expect("/soundctm/ack")
    c.send_raw(bundle(t + 0.4, encode_message("/soundctm/stop", job2)))
    c.expect("/soundctm/ack", 5)
    addr, args = c.expect(DONE_OR_FAIL, 5, match=lambda a: job2 in a)
    assert (addr, args) == ("/soundctm/fail", ("trigger", "stopped", job2))
    time.sleep(max(0.0, t + 0.6 - time.time()))  # until both would have sounded
    x = live.audio()
    start, stop = round(live.frame_of(t)), round(live.frame_of(t + 0.1))
    fade = round(0.005 * SR)
    assert x[start - 1] == 0 and x[start] == pytest.approx(0.25 * math.cos(math.pi / 4))
    np.testing.assert_allclose(x[start:stop], x[start])  # full level up to the stop's sample
    assert x[stop] == pytest.approx(x[start]) and 0 < x[stop + fade // 2] < x[start]  # then the fade
    assert not x[stop + fade :].any()  # and silence, the second voice included


@pytest.mark.parametrize("live", [{"voices": 2}], indirect=True)
def test_voice_slots_are_bounded(live: Live) -> None:
    t = time.time() + 1.0
    for _ in range(3):
        live.c.send_raw(bundle(t, trigger()))
    replies = [live.c.expect(("/soundctm/ack", "/soundctm/fail"), 5) for _ in range(4)]
    fails = [a for addr, a in replies if addr == "/soundctm/fail"]
    assert len(fails) == 1 and fails[0][0] == "trigger" and "busy" in fails[0][1], replies
    assert live.daemon.status()["scheduled"] == 2
