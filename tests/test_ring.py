"""The channels into the compiled callback: a streaming voice's samples under a concurrent producer, gap and
underrun counting, the frame grid under jittered and jumping DAC stamps, and the streaming resampler's
continuity across chunks."""

from __future__ import annotations

import math
import threading

import numpy as np

from soundctm_rt.daemon.mixer import StreamResampler, resample
from soundctm_rt.daemon.rtmix import SlotTable

SR = 48000


def _table(slots: int = 4, channels: int = 1) -> SlotTable:
    t = SlotTable(slots, channels, SR, 240)
    t.warmup()
    return t


def test_concurrent_producer_and_callback_see_every_sample_in_order() -> None:
    table = _table()
    total = 50_000
    src = np.arange(1, total + 1, dtype=np.float32) / 65536  # exact, in (0, 1]: a zero in the output is a gap
    buf = np.zeros(total, dtype=np.float32)
    s = table.free_slot()
    table.arm(s, 1, buf, 0, False, (1.0, 1.0, 1.0), math.nan, math.nan)

    def producer() -> None:
        i = 0
        while i < total:
            n = min(97, total - i)
            i += table.push(s, buf, i, src[i : i + n])
        table.close(s)

    t = threading.Thread(target=producer)
    t.start()
    out = np.zeros((64, 1), dtype=np.float32)
    got = []
    while table.state(s) != 2:  # DONE
        table.render(out, 0, 0.0, 0.0)
        got.append(out[:, 0].copy())
    t.join()
    played = np.concatenate(got)
    np.testing.assert_array_equal(played[played != 0], src)
    c = table.counters()
    # Pauses while the producer lagged; the wait before the first sample is not a gap (a voice starts with it).
    nz = np.flatnonzero(played)
    inner_zeros = np.count_nonzero(played[nz[0] : nz[-1]] == 0)
    assert c["voice_gaps"] == c["starved_callbacks"] and c["starved_frames"] >= inner_zeros


def test_gaps_and_underruns_are_counted_separately() -> None:
    table = _table()
    buf = np.ones(100, dtype=np.float32)
    s = table.free_slot()
    table.arm(s, 1, buf, 10, False, (1.0, 1.0, 1.0), math.nan, math.nan)  # 10 of 100 samples ready
    out = np.full((16, 1), 7.0, dtype=np.float32)
    table.render(out, 0x4, 1.0, 1.5)  # the device flagged paOutputUnderflow
    assert out[:10].sum() == 10 and not out[10:].any()
    c = table.counters()
    assert (c["callbacks"], c["underruns"], c["starved_callbacks"], c["starved_frames"], c["voice_gaps"]) == (
        1,
        1,
        1,
        6,
        1,
    )


def test_a_closed_voice_ends_without_counting_a_gap() -> None:
    table = _table()
    s = table.free_slot()
    table.arm(s, 1, np.ones(10, dtype=np.float32), 10, True, (1.0, 1.0, 1.0), math.nan, math.nan)
    out = np.zeros((16, 1), dtype=np.float32)
    table.render(out, 0, 0.0, 0.0)
    assert table.state(s) == 2 and table.counters()["voice_gaps"] == 0 and out.sum() == 10


def test_the_grid_is_the_earliest_stamp_and_a_jump_moves_it() -> None:
    """PortAudio stamps a callback when it runs, a few frames after its cycle began: the grid keeps the earliest
    phase; a stamp a whole block off is a jump (an xrun) and the grid moves there."""
    table = _table()
    out = np.zeros((256, 1), dtype=np.float32)
    late = [3, 1, 2, 0, 5, 27, 2, 0, 4]  # frames after the cycle start, as seen on a JACK dummy clock
    for k, d in enumerate(late):
        table.render(out, 0, 0.0, 10.0 + (k * 256 + d) / SR)
    grid = table.log_grid[: len(late)]
    np.testing.assert_allclose(grid[4:], 10.0 + np.arange(4, len(late)) * 256 / SR, atol=1e-12)
    assert table.counters()["clock_jumps"] == 0
    assert abs(table.dac_jitter_max() - 27 / SR) < 1e-12
    k = len(late)
    table.render(out, 0, 0.0, 10.0 + (k * 256 + 256 + 1) / SR)  # a skipped cycle
    table.render(out, 0, 0.0, 10.0 + ((k + 1) * 256 + 256) / SR)
    assert table.counters()["clock_jumps"] == 1
    assert table.log_grid[k + 1] == 10.0 + ((k + 1) * 256 + 256) / SR


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


def _tone_and_spur_db(y: np.ndarray, rate: int, f: float) -> tuple[float, float]:
    """Level of the tone at f (nan above Nyquist) and of the loudest other component, dB re the input's 0.5."""
    y = y[len(y) // 4 : 3 * len(y) // 4]
    w = np.blackman(len(y))
    spec = np.abs(np.fft.rfft(y * w)) / (0.25 * w.sum())
    freqs = np.fft.rfftfreq(len(y), 1 / rate)
    other = np.ones(len(spec), bool)
    tone = math.nan
    if f < rate / 2:
        k = int(np.argmin(np.abs(freqs - f)))
        tone = 20 * math.log10(spec[k - 3 : k + 4].max())
        other[max(0, k - 20) : k + 21] = False
    return tone, 20 * math.log10(spec[other].max() + 1e-12)


def test_resampler_passband_is_flat_and_images_and_aliases_are_below_100_db() -> None:
    """The model's 44.1 kHz to the usual device rates: up to 48 kHz (images just above 22.05 kHz fold back below
    24 kHz) and down to 22.05 / 16 kHz (a tone above the new Nyquist must not alias into the band)."""
    sr_in = 44100
    t = np.arange(sr_in) / sr_in
    for sr_out, f, passes in (
        (48000, 20000, True),
        (48000, 21500, True),
        (22050, 10000, True),
        (22050, 12000, False),
        (22050, 15000, False),
        (16000, 9000, False),
    ):
        x = (0.5 * np.sin(2 * np.pi * f * t)).astype(np.float32)
        tone, spur = _tone_and_spur_db(resample(x, sr_in, sr_out), sr_out, f)
        if passes and f <= 0.91 * min(sr_in, sr_out) / 2:
            assert abs(tone) < 0.1, (sr_out, f, tone)
        assert spur < -100, (sr_out, f, spur)
