"""Defects found by trying the daemon as a user would, each against a live daemon in this process:
a multi-step job stopped mid-sampling, a render folder swapped for a link while the job waits, render names
that must be refused before any work, and first-sample times that the clock mapping cannot support."""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from soundctm_rt.daemon.client import OscClient
from soundctm_rt.daemon.mixer import Mixer, Voice
from soundctm_rt.daemon.rtmix import SlotTable
from soundctm_rt.daemon.server import Daemon, DaemonConfig

DONE_OR_FAIL = ("/soundctm/done", "/soundctm/fail")


class GatedEngine:
    """The tiny engine, held at a gate inside each job until the test opens it: the pause between a request's
    checks and its work that a slow model gives, made deterministic."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.entered = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        self.entered.set()
        assert self.release.wait(10)
        return self._engine.generate(*args, **kwargs)

    def stream(self, prompt: str, should_stop: Any = None, **kwargs: Any) -> Any:
        self.entered.set()

        def gated() -> bool:  # polled between sampling steps: the job waits here, past its first step
            assert self.release.wait(10)
            return bool(should_stop and should_stop())

        return self._engine.stream(prompt, should_stop=gated, **kwargs)


@pytest.fixture()
def gated(tiny_engine, tmp_path):
    engine = GatedEngine(tiny_engine)
    cfg = DaemonConfig(port=0, no_audio=True, render_dir=tmp_path / "renders")
    cfg.render_dir.mkdir()
    dm = Daemon(engine, cfg, None)
    dm.start()
    try:
        with OscClient(dm.address[1]) as c:
            yield dm, engine, c
    finally:
        engine.release.set()
        dm.stop()


def test_stop_during_multistep_sampling_replies_stopped_without_traceback(gated, caplog) -> None:
    _dm, engine, c = gated
    caplog.set_level(logging.INFO)
    c.send("/soundctm/generate", "rain", 1, 4)
    _, (job,) = c.expect("/soundctm/ack")
    assert engine.entered.wait(10)
    c.send("/soundctm/stop")
    c.expect("/soundctm/ack")
    engine.release.set()
    addr, args = c.expect(DONE_OR_FAIL, 10, match=lambda a: job in a)
    assert (addr, args) == ("/soundctm/fail", ("generate", "stopped", job))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


def test_render_folder_swapped_for_a_link_cannot_redirect_the_write(gated, tmp_path) -> None:
    dm, engine, c = gated
    renders = dm.cfg.render_dir
    (renders / "race").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    c.send("/soundctm/render", "kick", "race/escaped.wav")
    _, (job,) = c.expect("/soundctm/ack")  # the name was checked and accepted
    assert engine.entered.wait(10)
    (renders / "race").rmdir()
    (renders / "race").symlink_to(outside, target_is_directory=True)
    engine.release.set()
    addr, args = c.expect(DONE_OR_FAIL, 30, match=lambda a: job in a)
    assert addr == "/soundctm/fail" and "link" in args[1], args
    assert list(outside.iterdir()) == []
    assert [p.name for p in renders.rglob("*") if p.name.endswith(".tmp")] == []


def test_render_target_that_became_a_folder_fails_and_leaves_no_temp_file(gated) -> None:
    dm, engine, c = gated
    c.send("/soundctm/render", "kick", "take.wav")
    _, (job,) = c.expect("/soundctm/ack")
    assert engine.entered.wait(10)
    (dm.cfg.render_dir / "take.wav").mkdir()
    engine.release.set()
    addr, args = c.expect(DONE_OR_FAIL, 30, match=lambda a: job in a)
    assert addr == "/soundctm/fail" and "folder" in args[1], args
    assert sorted(p.name for p in dm.cfg.render_dir.iterdir()) == ["take.wav"]


@pytest.mark.parametrize(
    "name,reason",
    [
        ("x" * 300 + ".wav", "longer than"),
        ("new\nline.wav", "control characters"),
        ("tab\there.wav", "control characters"),
        ("existing", ".wav"),
        ("existing.wav", "existing folder"),
        ("a/../../b.wav", "relative"),
        ("", "empty"),
    ],
)
def test_render_names_are_refused_before_any_work(gated, name: str, reason: str) -> None:
    dm, engine, c = gated
    (dm.cfg.render_dir / "existing.wav").mkdir()
    c.send("/soundctm/render", "kick", name)
    addr, args = c.expect(("/soundctm/ack", "/soundctm/fail"), 5)
    assert addr == "/soundctm/fail" and args[0] == "render" and reason in args[1], args
    assert len(args[1]) < 200
    assert not engine.entered.is_set()


def test_a_first_sample_time_before_its_mixing_is_flagged_not_published() -> None:
    """A DAC time (mapped to perf_counter) earlier than the moment the voice reached the mixer is the clock
    mapping's error (a non-realtime JACK after a flood gave -23.74 ms): it is reported as nan and counted."""
    table = SlotTable(8, 2, 48000, 240)
    table.warmup()
    started: list[float] = []
    skew = [0.0]
    mixer = Mixer(table, 48000, lambda t: t + skew[0], on_started=lambda v, ms: started.append(ms))

    def play(t_receipt_ago: float) -> None:
        import time

        n = len(started)
        v = Voice(1, time.perf_counter() - t_receipt_ago)
        v.push(np.ones(300, dtype=np.float32))
        v.close()
        assert mixer.add(v)
        out = np.zeros((256, 2), dtype=np.float32)
        for _ in range(8):  # callbacks until the voice's first sample has been played
            now = time.perf_counter()
            table.render(out, 0, now, now)  # the callback: DAC time = now on the stream clock
            mixer.step()
            if len(started) > n:
                return

    play(0.010)
    assert len(started) == 1 and 10.0 <= started[0] < 1000.0
    skew[0] = -0.050  # the mapping now puts DAC times 50 ms in the past
    play(0.010)
    assert len(started) == 2 and math.isnan(started[1])
    assert mixer.latencies_flagged == 1 and "clock mapping" in mixer.latency_flag_reason


def test_status_reports_flagged_latencies_and_clock_error(tiny_engine, tmp_path: Path) -> None:
    from soundctm_rt.daemon.server import open_output

    cfg = DaemonConfig(port=0, output=tmp_path / "s.wav")
    dm = Daemon(tiny_engine, cfg, open_output(cfg))
    try:
        s = dm.status()
        assert s["latencies_flagged"] == 0 and s["latency_flag_reason"] == "" and s["clock_sync_error_ms"] >= 0
    finally:
        dm.stop()


def test_stop_acks_the_voice_id_and_refuses_unknown_ids(gated) -> None:
    _dm, engine, c = gated
    c.send("/soundctm/generate", "rain", 1, 4)
    _, (job,) = c.expect("/soundctm/ack")
    c.send("/soundctm/stop", 987654)
    assert c.expect(("/soundctm/ack", "/soundctm/fail"), 5) == (
        "/soundctm/fail",
        ("stop", "no such voice: 987654 is not queued, generating or playing"),
    )
    c.send("/soundctm/stop", job)
    assert c.expect(("/soundctm/ack", "/soundctm/fail"), 5) == ("/soundctm/ack", (job,))
    engine.release.set()
    assert c.expect(DONE_OR_FAIL, 10, match=lambda a: job in a)[1][:2] == ("generate", "stopped")
    c.send("/soundctm/stop")
    assert c.expect(("/soundctm/ack", "/soundctm/fail"), 5) == ("/soundctm/ack", (0,))


def _bundle(messages: list[bytes]) -> bytes:
    import struct

    return b"#bundle\x00" + struct.pack(">Q", 1) + b"".join(struct.pack(">i", len(m)) + m for m in messages)


def test_replies_to_one_datagram_are_capped(gated) -> None:
    """One 8 KiB bundle of 292 /status messages drew 110 KiB of replies (13x): the daemon must not amplify."""
    from soundctm_rt.daemon.osc import encode_message
    from soundctm_rt.daemon.server import REPLY_BUDGET_FACTOR, REPLY_BUDGET_MIN

    _dm, _engine, c = gated
    data = _bundle([encode_message("/soundctm/status")] * 292)
    c.send_raw(data)
    got = 0
    fails = []
    while True:
        try:
            addr, args = c.expect(("/soundctm/status.reply", "/soundctm/fail"), 1.0)
        except TimeoutError:
            break
        got += len(encode_message(addr, *args))
        if addr == "/soundctm/fail":
            fails.append(args)
    assert got <= max(REPLY_BUDGET_MIN, REPLY_BUDGET_FACTOR * len(data)) + 2048, (got, len(data))
    assert len(fails) == 1 and fails[0][0] == "packet" and "capped" in fails[0][1], fails
    c.send("/soundctm/ping")
    assert c.expect("/soundctm/pong")[0] == "/soundctm/pong"


def test_dropped_strangers_are_counted_and_logged_once(tiny_engine, caplog) -> None:
    cfg = DaemonConfig(port=0, no_audio=True, allow=["10.0.0.0/8"])
    dm = Daemon(tiny_engine, cfg, None)
    try:
        caplog.set_level(logging.WARNING)
        assert dm._is_allowed("10.1.2.3") and dm._is_allowed("127.0.0.1") and dm._is_allowed("::1")
        assert not dm._is_allowed("192.0.2.7") and not dm._is_allowed("192.0.2.7")
        assert not dm._is_allowed("::ffff:192.0.2.8")  # an IPv4 client seen through an IPv6 socket
        assert dm.status()["disallowed"] == 3
        logged = [r.getMessage() for r in caplog.records if "not in --allow" in r.getMessage()]
        assert len(logged) == 2 and "192.0.2.7" in logged[0]
    finally:
        dm.stop()


def test_ipv6_loopback_serves(tiny_engine) -> None:
    import socket

    from soundctm_rt.daemon.osc import decode_packet, encode_message

    probe = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) if socket.has_ipv6 else None
    try:
        if probe is None:
            pytest.skip("no IPv6 here")
        probe.bind(("::1", 0))
    except OSError as e:
        pytest.skip(f"no IPv6 loopback: {e}")
    finally:
        if probe is not None:
            probe.close()
    dm = Daemon(tiny_engine, DaemonConfig(host="::1", port=0, no_audio=True), None)
    dm.start()
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        s.settimeout(5)
        s.sendto(encode_message("/soundctm/ping"), ("::1", dm.address[1]))
        assert decode_packet(s.recv(4096))[0].address == "/soundctm/pong"
    finally:
        s.close()
        dm.stop()


def test_busy_port_is_named_with_the_fix() -> None:
    import socket

    from soundctm_rt.daemon.server import BindError, bind_socket

    held = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    held.bind(("127.0.0.1", 0))
    try:
        port = held.getsockname()[1]
        with pytest.raises(BindError, match=rf"UDP port {port} on 127.0.0.1 is already in use.*--port"):
            bind_socket("127.0.0.1", port)
    finally:
        held.close()


def test_cache_limit_is_configurable_and_reported(tiny_engine) -> None:
    dm = Daemon(tiny_engine, DaemonConfig(port=0, no_audio=True, cache_mb=3), None)
    try:
        assert dm.cache.max_bytes == 3 << 20
        s = dm.status()
        assert s["cache_mb_limit"] == 3 and s["cache_mb"] == 0
    finally:
        dm.stop()


def test_ranges_read_as_written() -> None:
    from soundctm_rt.daemon import addresses as A

    with pytest.raises(A.Refusal, match=r"out of range \[0, 2147483647\]"):
        A.parse("/soundctm/generate", ("x", -1))
