"""A live daemon in this process (tiny random model, software clock, no sound card) driven over real UDP:
replies, refusals, busy, render confinement, and a fuzz of >= 10,000 hostile datagrams."""

from __future__ import annotations

import random
import struct
import time
from pathlib import Path

import pytest

from soundctm_rt.daemon.client import OscClient
from soundctm_rt.daemon.osc import encode_message
from soundctm_rt.daemon.server import Daemon, DaemonConfig, open_output

DONE_OR_FAIL = ("/soundctm/done", "/soundctm/fail")


@pytest.fixture(scope="module")
def daemon(tiny_engine, tmp_path_factory):
    d = tmp_path_factory.mktemp("daemon")
    cfg = DaemonConfig(port=0, max_queue=2, output=d / "session.wav", render_dir=d / "renders")
    dm = Daemon(tiny_engine, cfg, open_output(cfg))
    dm.start()
    yield dm
    dm.stop()


@pytest.fixture()
def client(daemon):
    with OscClient(daemon.address[1]) as c:
        yield c


def test_ping_and_status(client) -> None:
    client.send("/soundctm/ping")
    assert client.expect("/soundctm/pong") == ("/soundctm/pong", ())
    s = client.status()
    assert s["mode"] == "file" and s["samplerate"] == 48000 and s["underruns"] == 0


def test_generate_plays_and_reports_latency(client, daemon) -> None:
    t_sent = time.perf_counter()  # the daemon runs in this process: its receipt and DAC times are on this clock
    client.send("/soundctm/generate", "gritty", 808.0, "snare", 7.0, 1.0)  # as Pd sends it
    _, (job,) = client.expect("/soundctm/ack")
    addr, args = client.expect(DONE_OR_FAIL, 30, match=lambda a: a[-1] == job or a[0] == job)
    t_done = time.perf_counter()
    assert addr == "/soundctm/done", args
    _, latency_ms, rtf, audio_s, _total_ms = args
    # The first sample reaches the DAC after receipt, and /done is sent once the block holding it was mixed, at
    # most one block (the sink's output latency) before that block's DAC time.
    block_ms = 1e3 * daemon.cfg.blocksize / daemon.cfg.samplerate
    assert 0 < latency_ms <= 1e3 * (t_done - t_sent) + block_ms, (latency_ms, t_done - t_sent)
    assert rtf > 0 and audio_s == pytest.approx(daemon.engine.max_duration, rel=1e-3)
    assert daemon.status()["latency_last_ms"] == pytest.approx(latency_ms)


def test_preload_then_trigger_plays_from_cache(client) -> None:
    client.send("/soundctm/preload", "metal door slam", 2)
    _, (job,) = client.expect("/soundctm/ack")
    client.expect("/soundctm/done", 30, match=lambda a: a[0] == job)
    for _ in range(3):
        client.send("/soundctm/trigger", "metal", "door", "slam", 0.5, -1.0)
        _, (tid,) = client.expect("/soundctm/ack")
        _, args = client.expect("/soundctm/done", 5, match=lambda a, tid=tid: a[0] == tid)
        assert args[2] == 0.0  # no generation: a cached take
    assert client.status()["cached_takes"] == 2


@pytest.mark.parametrize(
    "data,command,reason",
    [
        (encode_message("/soundctm/generate", "x", float("nan")), "generate", "finite"),
        (encode_message("/soundctm/generate", "x", 1, 1, 0.0, 3.0, -2.0), "generate", "out of range"),
        (encode_message("/soundctm/generate", "x", 1, 1, 0.0, 3.0, 30.0), "generate", "duration"),  # > clip
        (encode_message("/soundctm/generate", "x", 1, 1, 0.0, 19.0), "generate", "omega"),  # outside training
        (encode_message("/soundctm/nothing"), "nothing", "unknown address"),
        (b"/soundctm/ping\x00\x00,s\x00\x00\xff\xff\x00\x00", "ping", "UTF-8"),
        (b"\x00\x01garbage", "packet", "malformed"),
        (encode_message("/soundctm/generate", "x" * 9000), "generate", "too large"),
        (encode_message("/soundctm/render", "x", "../escape.wav"), "render", "inside"),
        (encode_message("/soundctm/render", "x", "/etc/passwd.wav"), "render", "relative"),
        (encode_message("/soundctm/render", "x", "a.txt"), "render", ".wav"),
    ],
)
def test_refusals_come_back_as_fail(client, data: bytes, command: str, reason: str) -> None:
    client.send_raw(data)
    _, args = client.expect("/soundctm/fail")
    assert args[0] == command and reason in args[1], args


def test_render_writes_inside_the_folder(client, daemon) -> None:
    import soundfile as sf

    client.send("/soundctm/render", "rain on a tin roof", "sub/rain.wav", 3)
    _, (job,) = client.expect("/soundctm/ack")
    _, args = client.expect(DONE_OR_FAIL, 30, match=lambda a: job in a)
    path = Path(args[-1])
    assert path == (daemon.cfg.render_dir / "sub" / "rain.wav").resolve()
    audio, sr = sf.read(path)
    assert sr == daemon.engine.sample_rate and len(audio) > 0


def test_full_queue_answers_busy_at_once(client) -> None:
    n = 12  # queue of 2 + one in the worker: the rest must be refused immediately
    for i in range(n):
        client.send("/soundctm/generate", "busy test", i)
    replies = [client.expect(("/soundctm/ack", "/soundctm/fail", "/soundctm/done"), 5) for _ in range(n)]
    # every request is answered before any job finishes: a refusal does not wait for room in the queue
    assert all(addr != "/soundctm/done" for addr, _ in replies), replies
    busy = [a for addr, a in replies if addr == "/soundctm/fail"]
    assert busy and all(a[:2] == ("generate", "busy") for a in busy)
    acked = [a[0] for addr, a in replies if addr == "/soundctm/ack"]
    for job in acked:
        client.expect(DONE_OR_FAIL, 30, match=lambda a, job=job: job in a)


def test_stop_all_cuts_voices(client, daemon) -> None:
    client.send("/soundctm/stop")
    client.expect("/soundctm/ack")
    deadline = time.monotonic() + 2
    while daemon.mixer.active() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert daemon.mixer.active() == 0


def _fuzz_datagrams(n: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    valid = [
        encode_message("/soundctm/generate", "a b", 1, 1),
        encode_message("/soundctm/set", "gamma", 0.5),
        encode_message("/soundctm/status"),
        b"/soundctm/generate\x00\x00,cSi\x00\x00\x00\x00\x00\x00\x00xkick\x00\x00\x00\x00\x00\x00\x00\x03",
    ]
    out = []
    for i in range(n):
        k = i % 6
        if k == 0:
            d = rng.randbytes(rng.randint(0, 200))
        elif k == 1:
            d = b"/soundctm/" + rng.randbytes(rng.randint(0, 100))
        elif k == 2:  # bit flips in valid messages
            d = bytearray(rng.choice(valid))
            for _ in range(rng.randint(1, 4)):
                d[rng.randrange(len(d))] ^= 1 << rng.randrange(8)
            d = bytes(d)
        elif k == 3:  # truncations
            v = rng.choice(valid)
            d = v[: rng.randrange(len(v))]
        elif k == 4:  # random type tags with random payloads
            tags = "".join(rng.choice("ifsbhdtcSTFNI[]mrxq") for _ in range(rng.randint(0, 12)))
            d = encode_message("/soundctm/set")[:16] + b"," + tags.encode() + b"\x00" * (4 - (len(tags) + 1) % 4)
            d += rng.randbytes(rng.randint(0, 64))
        else:  # bundles, sometimes nested or lying about sizes
            inner = rng.choice(valid)
            size = len(inner) if rng.random() < 0.5 else rng.randint(-5, 500)
            d = b"#bundle\x00" + struct.pack(">Q", rng.getrandbits(64)) + struct.pack(">i", size) + inner
            if rng.random() < 0.3:
                d = b"#bundle\x00" + b"\x00" * 8 + struct.pack(">i", len(d)) + d
        out.append(d)
    return out


def test_fuzz_then_ping_and_generate_still_work(daemon) -> None:
    before = daemon.counters["datagrams"]
    with OscClient(daemon.address[1]) as c:
        for i, d in enumerate(_fuzz_datagrams(10_000)):
            c.send_raw(d)
            if i % 200 == 199:  # let the single OSC thread keep up rather than flood the kernel buffer
                c.send("/soundctm/ping")
                c.expect("/soundctm/pong", 10)
        c.send("/soundctm/ping")
        c.expect("/soundctm/pong", 10)
        assert daemon.counters["datagrams"] - before >= 10_000
        c.drain()  # every reply to the fuzz has been sent before the pong
        c.send("/soundctm/set", "gamma", 0.0)  # fuzzed /set messages may have changed defaults
        c.expect("/soundctm/ack", 10)
        deadline = time.monotonic() + 60
        while True:  # the queue may still hold generates the fuzz slipped through: wait until one fits
            c.send("/soundctm/generate", "still alive", 3, 1)
            addr, args = c.expect(("/soundctm/ack", "/soundctm/fail"), 10)
            if addr == "/soundctm/ack":
                break
            assert args[:2] == ("generate", "busy") and time.monotonic() < deadline, args
            time.sleep(0.2)
        (job,) = args
        addr, args = c.expect(DONE_OR_FAIL, 60, match=lambda a: job in a)
        assert addr == "/soundctm/done", args
