"""Sample-accurate timing on a real audio clock: a `soundctm-rt serve` process on JACK2's dummy backend (48 kHz,
256-frame periods), its output recorded by `jack_rec` from the daemon's JACK port. Time-tagged bundles must
land exactly their tags' distance apart in the recorded frames, also while a generate runs; the constant
latency mode must start untimed triggers at receipt + latency (the daemon's own figure, to the sample).

The dummy driver's timer wakes late on a loaded machine (a clock xrun), and JACK then re-phases its clock: an
attempt whose recording spans such an xrun cannot hold sample offsets and is repeated."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from soundctm_rt.bench.jack import JackDummy, jack_available
from soundctm_rt.bench.process import serve_process
from soundctm_rt.daemon.client import OscClient
from soundctm_rt.daemon.clock import unix_to_ntp
from soundctm_rt.daemon.osc import encode_bundle, encode_message

pytestmark = pytest.mark.realtime
SR = 48000
PAIR_FRAMES = 12_037  # the second bundle of a pair is tagged this many frames after the first
PAIR_EVERY = 0.7  # seconds between pairs (33,600 frames)
PAIRS = 4
ATTEMPTS = 3


def bundle(t_unix: float, *messages: bytes) -> bytes:
    """An OSC bundle time-tagged at Unix time t_unix."""
    return encode_bundle(unix_to_ntp(t_unix), *messages)


def onsets(x: np.ndarray, silence: int = 1000) -> list[int]:
    """Frames where sound starts after at least `silence` frames of digital silence."""
    nz = np.flatnonzero(x)
    return [int(f) for f in nz[np.r_[True, np.diff(nz) > silence]]] if len(nz) else []


@pytest.fixture()
def jack_live(tiny_bundle, tmp_path: Path) -> Any:
    why = jack_available() or (None if shutil.which("jack_rec") else "jack_rec not installed (apt-get install jackd2)")
    if why:
        pytest.skip(why)
    with (
        JackDummy(SR, 256, log_path=tmp_path / "jackd.log") as jack,
        serve_process(["--bundle", str(tiny_bundle)], env=jack.env()) as (port, _proc),
        OscClient(port) as c,
    ):
        c.send("/soundctm/set", "duration", 0.05)  # short takes: every sound is an onset after silence
        c.expect("/soundctm/ack")
        c.send("/soundctm/preload", "kick", 1)
        c.expect("/soundctm/done", 60)
        yield jack, c, tmp_path


def _record_pairs(jack: JackDummy, c: OscClient, wav: Path) -> tuple[list[int], bool]:
    """Send PAIRS pairs of time-tagged triggers (and an untimed generate) while jack_rec records the daemon's
    left output; returns (the onsets, whether the clock stayed clean)."""
    x0, j0 = jack.xruns(), c.status()["clock_jumps"]
    seconds = 1 + PAIRS * PAIR_EVERY
    rec = subprocess.Popen(
        ["jack_rec", "-f", str(wav), "-d", str(seconds), "PortAudio:out_0"],
        env=jack.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.3)
        c.send("/soundctm/generate", "snare", 3, 1)  # untimed: plays first, and keeps the worker busy
        t0 = time.time() + 0.3
        for i in range(PAIRS):
            t = t0 + i * PAIR_EVERY
            c.send_raw(bundle(t, encode_message("/soundctm/trigger", "kick")))
            c.send_raw(bundle(t + PAIR_FRAMES / SR, encode_message("/soundctm/trigger", "kick")))
        for _ in range(1 + 2 * PAIRS):
            addr, args = c.expect(("/soundctm/done", "/soundctm/fail"), 30)
            assert addr == "/soundctm/done", args
        rec.wait(timeout=seconds + 10)
    finally:
        if rec.poll() is None:
            rec.terminate()
            rec.wait(5)
    clean = jack.xruns()["clock"] == x0["clock"] and c.status()["clock_jumps"] == j0
    x, rate = sf.read(str(wav), dtype="float32")
    assert rate == SR
    return onsets(x), clean


def test_time_tagged_bundles_land_their_tags_apart_in_the_recording(jack_live) -> None:
    jack, c, tmp = jack_live
    for attempt in range(ATTEMPTS):
        got, clean = _record_pairs(jack, c, tmp / f"rec{attempt}.wav")
        if clean:
            break
    else:
        pytest.skip(f"the JACK dummy clock xran during each of {ATTEMPTS} recordings (machine too loaded)")
    assert len(got) == 1 + 2 * PAIRS, got  # the generate, then the pairs
    a, b = np.array(got[1::2]), np.array(got[2::2])
    # Within a sample: the daemon's frame grid sits on the earliest callback stamp it has seen, and in the first
    # seconds an earlier one can still move it by a frame (docs/osc.md, "The clocks"); over the 2 s between the
    # first and the last pair, two frames at most.
    assert np.all(np.abs(b - a - PAIR_FRAMES) <= 1), (b - a, PAIR_FRAMES)
    assert np.all(np.abs(np.diff(a) - round(PAIR_EVERY * SR)) <= 1), np.diff(a)
    assert abs(a[-1] - a[0] - (PAIRS - 1) * round(PAIR_EVERY * SR)) <= 2, a
    s = c.status()
    assert s["late"] == 0 and s["scheduled"] == 0
    assert 0 <= s["schedule_error_max_ms"] <= 1e3 / SR  # the daemon's own figure: within a sample of each tag


def _latency_mode_triggers(jack: JackDummy, c: OscClient) -> tuple[list[float], list[bool], bool]:
    """12 untimed triggers (a generate among them): their /done latency_ms, whether the daemon reported each as
    late (/soundctm/late), and whether the clock stayed clean."""
    x0, j0 = jack.xruns(), c.status()["clock_jumps"]
    lat, late = [], []
    for i in range(12):
        if i == 6:
            c.send("/soundctm/generate", "snare", 5, 1)  # a generate running while triggers arrive
        c.send("/soundctm/trigger", "kick")
        _, (job,) = c.expect("/soundctm/ack")
        was_late = False
        while True:
            addr, args = c.expect(("/soundctm/done", "/soundctm/late"), 10, match=lambda a, job=job: a[0] == job)
            if addr == "/soundctm/late":
                was_late = True
                continue
            break
        lat.append(args[1])
        late.append(was_late)
        time.sleep(0.0037 * (i % 5))  # arrivals at different phases of the period
    return lat, late, jack.xruns()["clock"] == x0["clock"] and c.status()["clock_jumps"] == j0


def test_constant_latency_mode_starts_untimed_triggers_at_receipt_plus_latency(jack_live) -> None:
    jack, c, _tmp = jack_live
    c.send("/soundctm/set", "latency", 30)
    c.expect("/soundctm/ack")
    for _attempt in range(ATTEMPTS):
        lat, late, clean = _latency_mode_triggers(jack, c)
        if clean:
            break
    else:
        pytest.skip(f"the JACK dummy clock xran during each of {ATTEMPTS} attempts (machine too loaded)")
    s = c.status()
    assert s["latency_ms"] == 30.0  # (the generate may start late: its sampling can take longer than 30 ms)
    # receipt -> first sample: 30 ms to the sample, give or take the clock mapping's re-measurements since
    tolerance = 1e3 / SR + 2 * s["clock_error_ms"] + 0.01
    # A trigger whose arming missed receipt + 30 ms (the interpreter starved on a loaded machine: CI measured one
    # 1.3 ms late beside the generate) plays at once and is reported late, scsynth style; it is never early, and
    # most triggers are on time.
    assert sum(late) <= 2, (lat, late)
    assert all(ms > 30.0 for ms, was_late in zip(lat, late, strict=True) if was_late), (lat, late)
    on_time = [ms for ms, was_late in zip(lat, late, strict=True) if not was_late]
    worst = max(abs(ms - 30.0) for ms in on_time)
    assert worst <= tolerance, f"worst error {worst:.4f} ms > {tolerance:.4f} ms: {lat}, {s['clock_error_ms']}"


def test_bench_latency_schedule_reports_scheduled_and_asap_figures(tiny_bundle, tmp_path: Path) -> None:
    if jack_available():
        pytest.skip(jack_available())
    out = tmp_path / "latency.json"
    cmd = [sys.executable, "-m", "soundctm_rt", "bench", "latency", "--bundle", str(tiny_bundle), "--triggers", "3"]
    r = subprocess.run([*cmd, "--schedule", "40", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(out.read_text())
    for key in ("schedule_error_ms", "schedule_error_samples", "constant_latency_error_ms", "asap_latency_ms"):
        assert {"p50", "p95", "p99", "max"} <= set(rep[key]) and rep[key]["n"] == 3, (key, rep[key])
    assert rep["schedule_error_ms"]["max"] >= 0 and rep["clock_error_ms"] >= 0
    assert "time-tagged (samples)" in r.stdout and "asap trigger" in r.stdout
