"""Voices, the mixer thread that keeps the ring topped up, and the streaming resampler (model rate -> device rate).

The mixer thread is the ring's only writer. It keeps `lead` frames published ahead of the audio callback: the
smaller the lead, the sooner a new voice is heard, the less slack the mixer has against scheduling hiccups.
It writes silence when nothing plays, so ring frame positions map one-to-one onto stream time and the voice's
first-sample DAC time can be read back from the callback log (ring.Ring.dac_time_of).
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable

import numpy as np
from numba import njit

from .ring import Ring

log = logging.getLogger(__name__)

FADE_SECONDS = 0.005  # fade applied on /stop, so a cut voice does not click
LATENCY_TOLERANCE_S = 0.001  # clock-sync error allowed before a first-sample time is called impossible


@njit(cache=True, nogil=True)  # pure function of its own arrays: let the audio thread have the GIL
def _sinc_kernel(x, p0, step, n_out, half, cutoff):  # pragma: no cover - compiled
    # Hann-windowed sinc interpolation of x at positions p0 + k * step (in input samples).
    out = np.empty(n_out, dtype=np.float32)
    for k in range(n_out):
        p = p0 + k * step
        i0 = math.floor(p)
        acc = 0.0
        for j in range(i0 - half + 1, i0 + half + 1):
            d = p - j
            u = d / half
            w = 0.5 + 0.5 * math.cos(math.pi * u)
            a = cutoff * d
            s = 1.0 if abs(a) < 1e-9 else math.sin(math.pi * a) / (math.pi * a)
            acc += x[j] * cutoff * s * w
        out[k] = acc
    return out


class StreamResampler:
    """Windowed-sinc resampling of a mono stream delivered in chunks; output is continuous across chunks.

    Args:
        rate_in: Hz of the input (the model's sample rate).
        rate_out: Hz of the output (the device's).
        half: taps either side of each output sample.
    """

    def __init__(self, rate_in: int, rate_out: int, half: int = 16) -> None:
        self.step = rate_in / rate_out
        self.same = rate_in == rate_out
        self.half = half
        self.cutoff = min(1.0, rate_out / rate_in) * (0.95 if rate_out < rate_in else 1.0)
        self.x = np.zeros(half, dtype=np.float32)  # left zero padding: output 0 sits on input 0
        self.p = float(half)
        self.n_in = 0
        self.n_out = 0

    def _emit(self) -> np.ndarray:
        pmax = len(self.x) - 1 - self.half
        if pmax < self.p:
            return np.zeros(0, dtype=np.float32)
        n = math.floor((pmax - self.p) / self.step) + 1
        y = _sinc_kernel(self.x, self.p, self.step, n, self.half, self.cutoff)
        self.p += n * self.step
        drop = max(0, math.floor(self.p) - self.half)
        self.x = self.x[drop:]
        self.p -= drop
        return y

    def push(self, chunk: np.ndarray) -> np.ndarray:
        """Resample the next input chunk `[n]` float32; returns what can be produced so far."""
        chunk = np.asarray(chunk, dtype=np.float32).reshape(-1)
        self.n_in += len(chunk)
        if self.same:
            self.n_out += len(chunk)
            return chunk
        self.x = np.concatenate([self.x, chunk])
        y = self._emit()
        self.n_out += len(y)
        return y

    def flush(self) -> np.ndarray:
        """The tail: output up to round(n_in * rate_out / rate_in) samples in total."""
        if self.same:
            return np.zeros(0, dtype=np.float32)
        self.x = np.concatenate([self.x, np.zeros(self.half + 1, dtype=np.float32)])
        y = self._emit()
        want = round(self.n_in / self.step) - self.n_out
        y = y[: max(0, want)]
        self.n_out += len(y)
        return y


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Resample a whole mono clip `[n]` float32."""
    r = StreamResampler(rate_in, rate_out)
    return np.concatenate([r.push(x), r.flush()])


class Voice:
    """One playing sound: mono float32 chunks at the device rate, appended by the worker, read by the mixer.

    Args:
        job_id: the id sent in /ack.
        t_receipt: time.perf_counter() when the OSC message arrived.
        gain: linear gain.
        pan: -1 .. 1, constant-power.
    """

    def __init__(self, job_id: int, t_receipt: float, gain: float = 1.0, pan: float = 0.0) -> None:
        self.id = job_id
        self.t_receipt = t_receipt
        theta = (pan + 1.0) * math.pi / 4
        self.gl = gain * math.cos(theta)
        self.gr = gain * math.sin(theta)
        self.gain = gain
        self.chunks: collections.deque[np.ndarray] = collections.deque()
        self.cur = np.zeros(0, dtype=np.float32)
        self.pos = 0
        self.closed = False  # the worker has pushed everything
        self.stopped = False  # /stop: fade out, and the worker stops generating
        self.fade_left = -1
        self.start_pos = -1  # absolute ring frame of the first sample
        self.t_mixed = 0.0  # perf_counter time the first sample was written to the ring
        self.samples = 0  # frames played
        self.gaps = 0  # blocks where a streaming voice had nothing ready (generation slower than real time)

    def push(self, y: np.ndarray) -> None:
        if len(y):
            self.chunks.append(y)

    def close(self) -> None:
        self.closed = True

    def take(self, n: int) -> np.ndarray:
        """Up to n next samples (fewer when the worker is behind)."""
        parts = []
        got = 0
        while got < n:
            if self.pos >= len(self.cur):
                if not self.chunks:
                    break
                self.cur = self.chunks.popleft()
                self.pos = 0
                continue
            k = min(n - got, len(self.cur) - self.pos)
            parts.append(self.cur[self.pos : self.pos + k])
            self.pos += k
            got += k
        if not parts:
            return np.zeros(0, dtype=np.float32)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    @property
    def done(self) -> bool:
        return (self.closed and not self.chunks and self.pos >= len(self.cur)) or self.fade_left == 0


StartedCallback = Callable[[Voice, float], None]  # (voice, latency_ms)


class Mixer:
    """Owns the voices and the ring's write side; runs in its own thread.

    Args:
        ring: the ring to feed.
        samplerate: device rate, Hz.
        blocksize: device block, frames.
        lead: frames to keep published ahead of the callback.
        to_perf: maps a DAC time on the stream clock to time.perf_counter().
        on_started: called from the mixer thread with (voice, latency_ms) once the first sample's DAC time is known.
    """

    def __init__(
        self,
        ring: Ring,
        samplerate: int,
        blocksize: int,
        lead: int,
        to_perf: Callable[[float], float],
        on_started: StartedCallback | None = None,
    ) -> None:
        self.ring = ring
        self.sr = samplerate
        self.block = blocksize
        self.lead = max(lead, 1)
        self.to_perf = to_perf
        self.on_started = on_started
        self.inbox: collections.deque[Voice] = collections.deque()  # deque append/popleft are atomic
        self.stops: collections.deque[int] = collections.deque()  # voice ids; 0 = all
        self.voices: list[Voice] = []
        self.pending: list[Voice] = []  # started, first-sample DAC time not known yet
        self.scratch = np.zeros((ring.capacity, ring.channels), dtype=np.float32)
        self.fade_frames = max(1, int(FADE_SECONDS * samplerate))
        self.voice_gaps = 0
        self.peak_voices = 0
        self.latencies_flagged = 0  # first-sample times the clock mapping cannot support (published as nan)
        self.latency_flag_reason = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- called from other threads ---
    def add(self, voice: Voice) -> None:
        self.inbox.append(voice)

    def stop_voice(self, voice_id: int) -> None:
        self.stops.append(voice_id)

    def active(self) -> int:
        return len(self.voices)

    # --- mixer thread ---
    def _apply_stops(self) -> None:
        while self.stops:
            vid = self.stops.popleft()
            for v in self.voices:
                if (vid == 0 or v.id == vid) and v.fade_left < 0:
                    v.stopped = True
                    v.fade_left = self.fade_frames

    def mix(self, n: int) -> np.ndarray:
        """Mix the next n frames of every voice into a `[n, channels]` view of the scratch buffer."""
        while self.inbox:
            self.voices.append(self.inbox.popleft())
        self._apply_stops()
        out = self.scratch[:n]
        out[:] = 0.0
        stereo = out.shape[1] >= 2
        for v in self.voices:
            y = v.take(n)
            k = len(y)
            if k == 0:
                if not v.closed:
                    v.gaps += 1
                    self.voice_gaps += 1
                continue
            if v.fade_left >= 0:
                f = min(k, v.fade_left)
                ramp = np.linspace(
                    v.fade_left / self.fade_frames,
                    (v.fade_left - f) / self.fade_frames,
                    f,
                    endpoint=False,
                    dtype=np.float32,
                )
                y = y[:f] * ramp
                k = f
                v.fade_left -= f
            if v.start_pos < 0:
                v.start_pos = self.ring.write_pos
                v.t_mixed = time.perf_counter()
                self.pending.append(v)
            v.samples += k
            if stereo:
                out[:k, 0] += y * np.float32(v.gl)
                out[:k, 1] += y * np.float32(v.gr)
            else:
                out[:k, 0] += y * np.float32(v.gain)
        self.voices = [v for v in self.voices if not v.done]
        self.peak_voices = max(self.peak_voices, len(self.voices))
        np.clip(out, -1.0, 1.0, out=out)
        return out

    def _resolve_started(self) -> None:
        if not self.pending:
            return
        keep = []
        read = int(self.ring.state[1])
        for v in self.pending:
            dac = self.ring.dac_time_of(v.start_pos, self.sr)
            if dac is None:
                if read > v.start_pos + self.sr * 10:  # fell out of the log: give up rather than leak
                    log.warning("voice %d: first-sample DAC time not found", v.id)
                else:
                    keep.append(v)
                continue
            latency_ms = self.latency_of(v, self.to_perf(dac))
            if self.on_started is not None:
                try:
                    self.on_started(v, latency_ms)
                except Exception:
                    log.exception("on_started failed for voice %d", v.id)
        self.pending = keep

    def latency_of(self, v: Voice, t_dac: float) -> float:
        """Receipt-to-DAC milliseconds of a voice's first sample, or nan when the clock mapping cannot support it.

        A sample cannot reach the DAC before the mixer wrote it into the ring, so a DAC time (mapped to
        perf_counter) earlier than the write is the mapping's error, not a latency: e.g. a non-realtime JACK
        whose late cycles report DAC times in the past. Such a figure is counted and flagged, never published.
        """
        if t_dac < v.t_mixed - LATENCY_TOLERANCE_S:
            self.latencies_flagged += 1
            self.latency_flag_reason = (
                f"DAC time {1e3 * (v.t_mixed - t_dac):.2f} ms before the sample was mixed: clock mapping error"
            )
            return math.nan
        return (t_dac - v.t_receipt) * 1000.0

    def drop_all(self) -> list[Voice]:
        """Every voice, queued, playing or waiting for its DAC time, taken out (call after stop())."""
        out = list(self.inbox) + self.voices + [v for v in self.pending if v not in self.voices]
        self.inbox.clear()
        self.voices = []
        self.pending = []
        return out

    def due(self) -> float | None:
        """Just-in-time mode (lead < one block): perf_counter time by which the next block must be published;
        None in fill mode or before the first callback."""
        if self.lead >= self.block:
            return None
        t = self.ring.last_callback_time()
        if t is None:
            return None
        return self.to_perf(t) + (self.block - self.lead) / self.sr

    def step(self) -> int:
        """Publish what is due; returns frames written.

        Fill mode (lead >= block): keep `lead` frames published. Just-in-time mode (lead < block): publish the
        next block `lead` frames' worth of time before the callback that plays it, so a voice that arrives
        until then still makes that callback.
        """
        fill = self.ring.fill()
        written = 0
        if self.lead >= self.block:
            need = self.lead - fill
        else:
            due = self.due()
            need = self.block - fill if due is None or time.perf_counter() >= due else 0
        if need > 0:
            written = self.ring.write(self.mix(min(need, self.ring.space())))
        self._resolve_started()
        return written

    def run(self, poll: float) -> None:
        while not self._stop.is_set():
            self.step()
            due = self.due()
            wait = poll
            if due is not None and self.ring.fill() < self.block:
                wait = min(poll, max(0.0, due - time.perf_counter()))
            time.sleep(wait)

    def start(self, poll: float | None = None) -> None:
        poll = poll if poll is not None else self.block / self.sr / 8
        self._thread = threading.Thread(target=self.run, args=(poll,), name="soundctm-mixer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
