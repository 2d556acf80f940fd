"""Voices, the mixer's Python side, and the streaming resampler (model rate -> device rate).

The mixing itself happens in the audio callback (rtmix.py: compiled, no interpreter). This side hands voices to
it through the slot table (`Mixer.add` arms a slot with the voice's buffer, gains and requested start time),
forwards stops, and runs a housekeeping thread that reports each voice's start (first-sample DAC time, how late,
the schedule error) and frees the slots the callback has finished with. Nothing here is on the audio deadline:
a slow housekeeping thread only delays replies.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable

import numpy as np
import soxr

from .rtmix import ARMED, DONE, SlotTable

log = logging.getLogger(__name__)

FADE_SECONDS = 0.005  # fade applied on /stop, so a cut voice does not click
LATENCY_TOLERANCE_S = 0.001  # clock-sync error allowed before a first-sample time is called impossible


# libsoxr's high-quality setting. Measured here (tests/test_ring.py): a tone at 0.91 of the lower Nyquist passes at
# -0.0 dB and every image or alias sits below -140 dB. The Hann-windowed sinc it replaced left images at -10 to
# -38 dB next to the Nyquist of 44.1 -> 48 kHz and ran 100x slower (4.8 s for 10 s of audio, soxr 46 ms).
SOXR_QUALITY = "HQ"


class StreamResampler:
    """Resampling of a mono stream delivered in chunks (libsoxr); output is continuous across chunks and equals
    resampling the whole stream at once. Output sample 0 is input sample 0: soxr holds back its filter delay
    (about 200 samples at 44.1 -> 48 kHz) until more input or `flush` releases it.

    Args:
        rate_in: Hz of the input (the model's sample rate).
        rate_out: Hz of the output (the device's).
    """

    def __init__(self, rate_in: int, rate_out: int) -> None:
        self.same = rate_in == rate_out
        self.ratio = rate_out / rate_in
        self._soxr = None if self.same else soxr.ResampleStream(rate_in, rate_out, 1, "float32", SOXR_QUALITY)
        self.n_in = 0
        self.n_out = 0

    def push(self, chunk: np.ndarray) -> np.ndarray:
        """Resample the next input chunk `[n]` float32; returns what can be produced so far."""
        chunk = np.ascontiguousarray(chunk, dtype=np.float32).reshape(-1)
        self.n_in += len(chunk)
        y = chunk if self._soxr is None else self._soxr.resample_chunk(chunk)
        self.n_out += len(y)
        return y

    def flush(self) -> np.ndarray:
        """The tail: output up to round(n_in * rate_out / rate_in) samples in total."""
        if self._soxr is None:
            return np.zeros(0, dtype=np.float32)
        y = self._soxr.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        self.n_out += len(y)
        return y


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Resample a whole mono clip `[n]` float32."""
    r = StreamResampler(rate_in, rate_out)
    return np.concatenate([r.push(x), r.flush()])


class Voice:
    """One sound for the callback to play: mono float32 samples at the device rate, in a buffer that the worker
    fills while the voice plays (a streaming generation) or that is complete from the start (a cached take).

    Args:
        job_id: the id sent in /ack.
        t_receipt: time.perf_counter() when the OSC message arrived.
        gain: linear gain.
        pan: -1 .. 1, constant-power.
        take: the complete samples [n] (played without a copy); None for a voice filled by `push`.
        capacity: samples the buffer holds when `take` is None (it grows until the voice is armed, not after).
        t_start: requested start on the stream clock (s); NaN: as soon as possible.
        t_stop: requested stop (fade start) on the stream clock (s); NaN: none.
    """

    def __init__(
        self,
        job_id: int,
        t_receipt: float,
        gain: float = 1.0,
        pan: float = 0.0,
        *,
        take: np.ndarray | None = None,
        capacity: int = 0,
        t_start: float = math.nan,
        t_stop: float = math.nan,
    ) -> None:
        self.id = job_id
        self.t_receipt = t_receipt
        theta = (pan + 1.0) * math.pi / 4
        self.gl = gain * math.cos(theta)
        self.gr = gain * math.sin(theta)
        self.gain = gain
        if take is not None:
            self.buf = np.ascontiguousarray(take, dtype=np.float32).reshape(-1)
            self.filled = len(self.buf)
            self.closed = True
        else:
            self.buf = np.zeros(max(0, capacity), dtype=np.float32)
            self.filled = 0
            self.closed = False  # the worker has pushed everything
        self.t_start = t_start
        self.t_stop = t_stop
        self.stopped = False  # /stop: fade out, and the worker stops generating
        self.table: SlotTable | None = None
        self.slot = -1
        self.t_armed = 0.0  # perf_counter time the voice was handed to the callback
        self.first_frame = -1  # absolute output frame of the first sample, once it started
        self.first_dac = math.nan  # its DAC time, stream clock
        self.late_s = 0.0  # how much after t_start it started (0: on time)
        self.error_s = math.nan  # first-sample DAC time - t_start (s), for a voice with a requested start
        self.ended = False
        self.cut = False  # ended before its producer closed it (a stop): the rest will not play
        self.dropped = 0  # samples pushed past the armed buffer's end (not played)

    @property
    def timed(self) -> bool:
        return not math.isnan(self.t_start)

    def push(self, y: np.ndarray) -> None:
        """Append samples [n] float32; the callback may play them from now on."""
        y = np.asarray(y, dtype=np.float32).reshape(-1)
        if not len(y) or self.ended:
            return
        if self.table is None:
            if self.filled + len(y) > len(self.buf):  # not armed yet: the buffer may still move
                grown = np.zeros(max(2 * len(self.buf), self.filled + len(y)), dtype=np.float32)
                grown[: self.filled] = self.buf[: self.filled]
                self.buf = grown
            self.buf[self.filled : self.filled + len(y)] = y
            n = len(y)
        else:
            n = self.table.push(self.slot, self.buf, self.filled, y)
            if n < len(y):
                if not self.dropped:
                    log.warning("voice %d: %d samples past its buffer are dropped", self.id, len(y) - n)
                self.dropped += len(y) - n
        self.filled += n

    def close(self) -> None:
        """Every sample is pushed: the voice ends when the callback has played them."""
        self.closed = True
        if self.table is not None:
            self.table.close(self.slot)

    @property
    def done(self) -> bool:
        return self.ended


StartedCallback = Callable[[Voice, float], None]  # (voice, latency_ms)
VoiceCallback = Callable[[Voice], None]


class Mixer:
    """Hands voices to the compiled callback and reports on them; its thread does the housekeeping.

    Args:
        table: the slot table the callback mixes.
        samplerate: device rate, Hz.
        to_perf: maps a DAC time on the stream clock to time.perf_counter().
        on_started: called from the mixer thread with (voice, latency_ms) once the first sample's DAC time is
            known; latency_ms is nan when the clock mapping cannot support the figure.
        on_unplayed: called from the mixer thread with a voice that ended without a sample played (stopped
            before its start).
    """

    def __init__(
        self,
        table: SlotTable,
        samplerate: int,
        to_perf: Callable[[float], float],
        on_started: StartedCallback | None = None,
        on_unplayed: VoiceCallback | None = None,
    ) -> None:
        self.table = table
        self.sr = samplerate
        self.to_perf = to_perf
        self.on_started = on_started
        self.on_unplayed = on_unplayed
        self.voices: dict[int, Voice] = {}  # slot -> voice, while the slot is not FREE
        self._lock = threading.Lock()  # the OSC thread and the worker both arm slots
        self.latencies_flagged = 0  # first-sample times the clock mapping cannot support (published as nan)
        self.latency_flag_reason = ""
        self.schedule_errors: collections.deque[float] = collections.deque(maxlen=1000)  # s, timed voices
        self.late = 0  # timed voices that started after their requested time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- called from other threads ---
    def add(self, voice: Voice) -> bool:
        """Hand a voice to the callback; False when every slot is taken (the voice does not play)."""
        with self._lock:
            s = self.table.free_slot()
            if s < 0:
                return False
            voice.table, voice.slot, voice.t_armed = self.table, s, time.perf_counter()
            self.voices[s] = voice
            self.table.arm(
                s,
                voice.id,
                voice.buf,
                voice.filled,
                voice.closed,
                (voice.gl, voice.gr, voice.gain),
                voice.t_start,
                voice.t_stop,
            )
        return True

    def stop_voice(self, voice_id: int, t_stop: float = math.nan) -> None:
        """Fade out voice `voice_id` (0: every voice) now, or from stream time t_stop."""
        with self._lock:
            for s, v in self.voices.items():
                if (voice_id == 0 or v.id == voice_id) and not v.ended:
                    if math.isnan(t_stop):
                        v.stopped = True
                    else:
                        v.t_stop = t_stop
                    self.table.stop(s, t_stop)

    def has_voice(self, voice_id: int) -> bool:
        """Whether a voice with this id waits for its start or sounds."""
        with self._lock:
            return any(v.id == voice_id and not v.ended for v in self.voices.values())

    def active(self) -> int:
        """Voices sounding or waiting for their start time."""
        return len(self.voices)

    def scheduled(self) -> int:
        """Voices waiting for their requested start time."""
        with self._lock:
            return sum(1 for v in self.voices.values() if v.timed and v.first_frame < 0)

    # --- the mixer thread ---
    def step(self) -> None:
        """Report voices that started, free the slots of those that ended."""
        with self._lock:
            voices = list(self.voices.items())
        for s, v in voices:
            state = self.table.state(s)  # before the start fields: once DONE, they are final
            if v.first_frame < 0:
                first, dac, late = self.table.started(s)
                if first >= 0:
                    self._report_started(v, first, dac, late)
            if state == DONE:
                if not v.ended:
                    v.ended = True  # a streaming voice's worker stops generating into it
                    v.cut = not v.closed
                    if v.first_frame < 0 and self.on_unplayed is not None:
                        self._call(self.on_unplayed, v)
                if v.closed:  # its producer is done with the slot: free it
                    with self._lock:
                        del self.voices[s]
                        self.table.release(s)
            elif state != ARMED:
                log.warning("voice %d: slot %d in unexpected state %d", v.id, s, state)

    def _report_started(self, v: Voice, first: int, dac: float, late: float) -> None:
        v.first_frame, v.first_dac, v.late_s = first, dac, late
        if v.timed:
            v.error_s = dac - v.t_start
            self.schedule_errors.append(v.error_s)
            if late > 0:
                self.late += 1
        latency_ms = self.latency_of(v, self.to_perf(dac))
        if self.on_started is not None:
            self._call(self.on_started, v, latency_ms)

    @staticmethod
    def _call(fn: Callable[..., None], *args: object) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("mixer callback %s failed", getattr(fn, "__name__", fn))

    def latency_of(self, v: Voice, t_dac: float) -> float:
        """Receipt-to-DAC milliseconds of a voice's first sample, or nan when the clock mapping cannot support it.

        A sample cannot reach the DAC before the voice was handed to the callback, so a DAC time (mapped to
        perf_counter) earlier than that is the mapping's error, not a latency: e.g. a non-realtime JACK whose
        late cycles report DAC times in the past. Such a figure is counted and flagged, never published.
        """
        if t_dac < v.t_armed - LATENCY_TOLERANCE_S:
            self.latencies_flagged += 1
            self.latency_flag_reason = (
                f"DAC time {1e3 * (v.t_armed - t_dac):.2f} ms before the voice reached the mixer: clock mapping error"
            )
            return math.nan
        return (t_dac - v.t_receipt) * 1000.0

    def drop_all(self) -> list[Voice]:
        """Every voice taken out and its slot freed (call after stop(), once the callback no longer runs)."""
        with self._lock:
            out = list(self.voices.values())
            for s in self.voices:
                self.table.release(s)
            self.voices.clear()
        for v in out:
            v.ended = True
        return out

    def run(self, poll: float) -> None:
        while not self._stop.is_set():
            self.step()
            time.sleep(poll)

    def start(self, poll: float = 0.002) -> None:
        self._thread = threading.Thread(target=self.run, args=(poll,), name="soundctm-mixer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
