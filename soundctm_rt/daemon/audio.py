"""Where the mixed audio goes: a PortAudio output stream (the DAC), or a software clock that writes a WAV file or
discards (render mode without a sound card).

Clocks. PortAudio reports callback times (`time_info.outputBufferDacTime`) on the stream's own clock, the one
`stream.time` reads (Pa_GetStreamTime); with JACK it is JACK's frame time in whole frames, not CLOCK_MONOTONIC.
The daemon stamps OSC receipt with `time.perf_counter()`. `DeviceOutput.sync_clock()` measures the offset
between the two by bracketing `stream.time` between two perf_counter reads at the moment its reading steps
(clock.bracket_offset: error within a few microseconds); the daemon re-syncs twice a second, so drift between
the clocks does not accumulate. `to_perf(t_stream) = t_stream + offset`, `from_perf` the inverse.

The device callback is not Python: PortAudio calls `rtmix.pa_output_callback`, a numba `cfunc`, with the slot
table's arrays passed as addresses in its userdata. It schedules, mixes, fades and counts without the
interpreter: no GIL to wait for, no objects allocated (sounddevice's Python callback wrapper would build an
ndarray and a CallbackFlags object per block, and need the GIL to do it). The stream is opened through
sounddevice's `_StreamBase` with a function pointer, the extension point python-rtmixer uses for its C callback.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .clock import bracket_offset
from .rtmix import SlotTable, pa_output_callback

log = logging.getLogger(__name__)


class NoAudioDevice(RuntimeError):
    """No usable audio output; the message says what to do instead."""


STALL_SECONDS = 1.0  # no callbacks for this long: the device is lost (a callback is due every few ms)
CLOSE_TIMEOUT = 1.0
NO_DEVICE_HINT = "no audio output device ({why}); use --output FILE.wav to record, or --no-audio for replies only"


class AudioOutput(Protocol):
    """What the daemon needs of an audio output: the device (DeviceOutput) or a software clock that writes a WAV
    file or discards (ClockedSink). Its callback or clock thread renders `table`; times are on its stream clock.
    """

    table: SlotTable  # the voice slots it plays
    sync_error: float  # half the bracket of the last clock sync, seconds
    sync_step: float  # how far the clock offset moved at the last sync, seconds
    abandoned: bool  # the stream could not be closed: leave the process without PortAudio's atexit

    def start(self) -> None:
        """Start playing (rendering) the table."""

    def close(self) -> None:
        """Stop and release the stream or file."""

    def sync_clock(self) -> float:
        """Re-measure the stream clock against time.perf_counter(); returns the offset, seconds."""

    def to_perf(self, t_stream: float) -> float:
        """A stream-clock time as time.perf_counter() time, seconds."""

    def from_perf(self, t_perf: float) -> float:
        """A time.perf_counter() time on the stream clock, seconds."""

    def lost(self) -> str | None:
        """Why the output died, or None while it plays."""


class DeviceOutput:
    """A PortAudio output stream whose callback mixes the slot table.

    Args:
        table: the voice slots the callback plays.
        samplerate: Hz.
        blocksize: frames per callback (fixed).
        channels: output channels.
        device: PortAudio device name or index; None for the default.
    """

    def __init__(
        self, table: SlotTable, samplerate: int, blocksize: int, channels: int, device: str | int | None
    ) -> None:
        try:
            import sounddevice as sd  # initialises PortAudio; with JACK, jackd must already run
        except OSError as e:
            raise NoAudioDevice(NO_DEVICE_HINT.format(why=f"PortAudio not found: {e}")) from None
        self.sd = sd
        self.table = table
        self.samplerate = samplerate
        self.blocksize = blocksize
        self.offset = 0.0  # perf_counter - stream clock, seconds
        self.sync_error = 0.0  # half the bracket of the last clock sync, seconds
        self.sync_step = 0.0  # how far the offset moved at the last sync (drift since the one before), seconds
        self.abandoned = False  # the stream could not be closed (its server died): exit without PortAudio's atexit
        self.lost_reason: str | None = None  # set once by lost(); a lost stream stays lost
        self._started = False
        self._last_callbacks = -1
        self._last_progress = 0.0
        try:
            if device is None:
                sd.query_devices(kind="output")
            # the userdata block and the arrays it points to live as long as self.table
            self.stream = sd._StreamBase(
                kind="output",
                samplerate=samplerate,
                blocksize=blocksize,
                channels=channels,
                dtype="float32",
                device=device,
                latency="low",
                callback=sd._ffi.cast("PaStreamCallback*", pa_output_callback.address),
                userdata=sd._ffi.cast("void*", table.callback_userdata(channels)),
            )
        except (sd.PortAudioError, ValueError) as e:
            sd._terminate()
            raise NoAudioDevice(NO_DEVICE_HINT.format(why=str(e).splitlines()[0])) from None

    @property
    def latency(self) -> float:
        """PortAudio's reported output latency, seconds."""
        return float(self.stream.latency)

    def start(self) -> None:
        self.stream.start()
        # The stream clock settles once callbacks run (JACK's frame time starts with the first cycle).
        deadline = time.monotonic() + 2.0
        while self.table.counters()["callbacks"] < 8 and time.monotonic() < deadline:
            time.sleep(self.blocksize / self.samplerate)
        self.sync_clock()
        self.sync_step = 0.0
        self._started = True
        self._last_progress = time.monotonic()

    def sync_clock(self, tries: int = 5) -> float:
        """Re-measure perf_counter - stream clock; returns the error bound (s) of the new offset."""
        offset, error = bracket_offset(lambda: float(self.stream.time), tries)
        self.sync_step = abs(offset - self.offset)
        self.offset, self.sync_error = offset, error
        return error

    def to_perf(self, t_stream: float) -> float:
        return t_stream + self.offset

    def from_perf(self, t_perf: float) -> float:
        return t_perf - self.offset

    def lost(self, stall_seconds: float = STALL_SECONDS) -> str | None:
        """Why the stream is dead, or None while it runs. Cheap: call it often (the daemon's watchdog does).

        Two signs, because servers die differently: PortAudio marks the stream inactive when its host API
        shuts it down (JACK's shutdown callback), and a stream whose callbacks stop for `stall_seconds` is
        dead whatever the host API says (a frozen server keeps the stream "active").
        """
        if self.lost_reason is not None or not self._started:
            return self.lost_reason
        n = self.table.counters()["callbacks"]
        now = time.monotonic()
        if not self.stream.active:
            self.lost_reason = "the audio stream stopped (audio server or device gone)"
        elif n != self._last_callbacks:
            self._last_callbacks = n
            self._last_progress = now
        elif now - self._last_progress > stall_seconds:
            self.lost_reason = f"no audio callbacks for {now - self._last_progress:.1f} s (audio server stalled)"
        return self.lost_reason

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Stop and close the stream, then terminate PortAudio (before anyone stops jackd).

        A stream whose server died cannot be stopped: Pa_StopStream, Pa_AbortStream and Pa_CloseStream wait
        forever for it (JACK), and Pa_Terminate then fails an assertion. So a lost stream is not touched, a
        close that does not return in `timeout` is given up, and either way `abandoned` is set: the process
        must then leave with os._exit, skipping sounddevice's atexit Pa_Terminate.
        """
        if self.lost(stall_seconds=float("inf")) is not None:  # a stall already seen counts
            self.abandoned = True
            log.warning("audio stream lost: not closing it")
            return

        def _close() -> None:
            try:
                self.stream.stop()
                self.stream.close()
            finally:
                self.sd._terminate()

        t = threading.Thread(target=_close, name="soundctm-audio-close", daemon=True)
        t.start()
        t.join(timeout)
        if t.is_alive():
            self.abandoned = True
            log.warning("the audio stream did not close within %.1f s: leaving it", timeout)


class ClockedSink:
    """A software audio clock: mixes one block per period on time.perf_counter, writing a WAV or discarding.

    Its stream clock is perf_counter itself (`to_perf` is the identity) and it behaves like a device with one
    block of output latency: the block mixed for period k reaches the "DAC" at start + (k + 1) periods, exactly
    (a late wake-up mixes late, the DAC times stay on the grid), so frame f of the file plays at
    `t0 + f / samplerate` for the `t0` of frame 0 (`dac_time_of_frame`).

    Args:
        table: the voice slots to mix.
        samplerate: Hz.
        blocksize: frames per period.
        path: WAV file to write (float32), or None to discard.
    """

    def __init__(self, table: SlotTable, samplerate: int, blocksize: int, path: Path | None = None) -> None:
        self.table = table
        self.samplerate = samplerate
        self.blocksize = blocksize
        self.path = path
        self.latency = blocksize / samplerate
        self.t0 = 0.0  # DAC time of frame 0 (perf_counter), set by start()
        self.buf = np.zeros((blocksize, table.channels), dtype=np.float32)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._file: Any = None
        if path is not None:
            import soundfile as sf

            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = sf.SoundFile(str(path), "w", samplerate=samplerate, channels=table.channels, subtype="FLOAT")

    def _run(self) -> None:
        period = self.blocksize / self.samplerate
        k = 0  # blocks since t0
        t = self.t0 - period  # when block k is due to be mixed
        while not self._stop.is_set():
            delay = t - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            elif delay < -0.5:  # the process was stopped: jump ahead rather than burst (the grid moves)
                self.t0 = time.perf_counter() + period - k * period
                t = self.t0 + (k - 1) * period
            now = time.perf_counter()
            self.table.render(self.buf, 0, now, self.t0 + k * period)
            if self._file is not None:
                self._file.write(self.buf)
            k += 1
            t += period

    def dac_time_of_frame(self, frame: int) -> float:
        """perf_counter time at which output frame `frame` plays (written to the file at that index)."""
        return self.t0 + frame / self.samplerate

    def start(self) -> None:
        self.t0 = time.perf_counter() + self.latency
        self._thread = threading.Thread(target=self._run, name="soundctm-clock", daemon=True)
        self._thread.start()

    sync_error = 0.0
    sync_step = 0.0
    abandoned = False

    def sync_clock(self, tries: int = 5) -> float:
        return 0.0

    def to_perf(self, t: float) -> float:
        return t

    def from_perf(self, t: float) -> float:
        return t

    def lost(self, stall_seconds: float = STALL_SECONDS) -> str | None:
        return None  # a software clock cannot die

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        if self._file is not None:
            self._file.close()
