"""The SPSC ring: integrity under a concurrent writer and reader, starvation counting, the DAC-time log, and the
streaming resampler's continuity across chunks."""

from __future__ import annotations

import threading

import numpy as np

from soundctm_rt.daemon.mixer import StreamResampler, resample
from soundctm_rt.daemon.ring import Ring, next_pow2


def test_capacity_is_power_of_two() -> None:
    assert next_pow2(1) == 1 and next_pow2(1000) == 1024 and next_pow2(1024) == 1024
    assert Ring(1000, 2).capacity == 1024


def test_concurrent_writer_and_reader_see_every_frame_in_order() -> None:
    ring = Ring(256, 2)
    ring.warmup()
    total = 50_000
    got = np.zeros((total, 2), dtype=np.float32)
    src = np.stack([np.arange(total, dtype=np.float32)] * 2, axis=1)

    def writer() -> None:
        i = 0
        while i < total:
            i += ring.write(src[i : min(total, i + 97)])

    t = threading.Thread(target=writer)
    t.start()
    out = np.zeros((64, 2), dtype=np.float32)
    pos = 0
    while pos < total:
        before = ring.counters()["starved_frames"]
        ring.read_into(out, 0, 0.0, 0.0)
        n = 64 - (ring.counters()["starved_frames"] - before)
        k = min(n, total - pos)
        got[pos : pos + k] = out[:k]
        assert not out[n:].any(), "starved part must be zero-filled"
        pos += n
    t.join()
    np.testing.assert_array_equal(got, src)


def test_starvation_and_underrun_are_counted_separately() -> None:
    ring = Ring(64, 1)
    ring.write(np.ones((10, 1), dtype=np.float32))
    out = np.full((16, 1), 7.0, dtype=np.float32)
    ring.read_into(out, 0x4, 1.0, 1.5)  # the device flagged paOutputUnderflow
    assert out[:10].sum() == 10 and not out[10:].any()
    c = ring.counters()
    assert c == {"callbacks": 1, "underruns": 1, "starved_callbacks": 1, "starved_frames": 6}


def test_dac_time_of_a_frame() -> None:
    ring = Ring(1024, 1)
    out = np.zeros((256, 1), dtype=np.float32)
    ring.write(np.zeros((600, 1), dtype=np.float32))
    ring.read_into(out, 0, 10.0, 10.01)
    ring.read_into(out, 0, 10.00533, 10.01533)
    assert ring.dac_time_of(300, 48000.0) == 10.01533 + 44 / 48000.0
    assert ring.dac_time_of(0, 48000.0) == 10.01
    assert ring.dac_time_of(512, 48000.0) is None  # not read yet


def test_resampler_chunks_equal_whole_and_keep_a_sine() -> None:
    sr_in, sr_out = 44100, 48000
    x = np.sin(2 * np.pi * 440 * np.arange(sr_in // 2) / sr_in).astype(np.float32)
    whole = resample(x, sr_in, sr_out)
    r = StreamResampler(sr_in, sr_out)
    parts = [r.push(x[i : i + 1024]) for i in range(0, len(x), 1024)] + [r.flush()]
    chunked = np.concatenate(parts)
    assert len(whole) == len(chunked) == round(len(x) * sr_out / sr_in)
    np.testing.assert_allclose(chunked, whole, atol=1e-6)
    ref = np.sin(2 * np.pi * 440 * np.arange(len(whole)) / sr_out)
    mid = slice(100, len(whole) - 100)  # edges see the zero padding
    assert np.max(np.abs(whole[mid] - ref[mid])) < 2e-3
