"""Where the ring drains: a sounddevice OutputStream (the DAC), or a software clock that writes a WAV file or
discards (render mode without a sound card).

Clocks. PortAudio reports callback times (`time_info.outputBufferDacTime`) on the stream's own clock, the one
`stream.time` reads (Pa_GetStreamTime); with JACK it is JACK's frame time, not CLOCK_MONOTONIC. The daemon
stamps OSC receipt with `time.perf_counter()`. `DeviceOutput.sync_clock()` measures the offset between the two
by reading perf_counter, stream.time, perf_counter back to back and keeping the tightest bracket of a few
tries (error <= half that bracket, typically a few microseconds); the mixer re-syncs every second, so drift
between the clocks does not accumulate. `to_perf(t_stream) = t_stream + offset`.

The device callback is not Python: PortAudio calls `ring.pa_output_callback`, a numba `cfunc`, with the ring's
arrays passed as addresses in its userdata. It copies, zero-fills and counts, exactly like `Ring.read_into`,
without the interpreter: no GIL to wait for, no objects allocated (sounddevice's Python callback wrapper would
build an ndarray and a CallbackFlags object per block, and need the GIL to do it). The stream is opened through
sounddevice's `_StreamBase` with a function pointer, the extension point python-rtmixer uses for its C callback.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from .ring import Ring, pa_output_callback

log = logging.getLogger(__name__)


class NoAudioDevice(RuntimeError):
    """No usable audio output; the message says what to do instead."""


NO_DEVICE_HINT = "no audio output device ({why}); use --output FILE.wav to record, or --no-audio for replies only"


class DeviceOutput:
    """A PortAudio output stream fed from the ring.

    Args:
        ring: the ring to drain.
        samplerate: Hz.
        blocksize: frames per callback (fixed).
        channels: output channels.
        device: PortAudio device name or index; None for the default.
    """

    def __init__(self, ring: Ring, samplerate: int, blocksize: int, channels: int, device: str | int | None) -> None:
        try:
            import sounddevice as sd  # initialises PortAudio; with JACK, jackd must already run
        except OSError as e:
            raise NoAudioDevice(NO_DEVICE_HINT.format(why=f"PortAudio not found: {e}")) from None
        self.sd = sd
        self.ring = ring
        self.samplerate = samplerate
        self.blocksize = blocksize
        self.offset = 0.0
        try:
            if device is None:
                sd.query_devices(kind="output")
            # the userdata block and the arrays it points to live as long as self.ring
            self.stream = sd._StreamBase(
                kind="output",
                samplerate=samplerate,
                blocksize=blocksize,
                channels=channels,
                dtype="float32",
                device=device,
                latency="low",
                callback=sd._ffi.cast("PaStreamCallback*", pa_output_callback.address),
                userdata=sd._ffi.cast("void*", ring.callback_userdata(channels)),
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
        while self.ring.counters()["callbacks"] < 8 and time.monotonic() < deadline:
            time.sleep(self.blocksize / self.samplerate)
        self.sync_clock()

    def sync_clock(self, tries: int = 5) -> float:
        """Re-measure perf_counter - stream clock; returns the bracket width (s) of the kept sample."""
        best = (float("inf"), 0.0)
        for _ in range(tries):
            a = time.perf_counter()
            st = self.stream.time
            b = time.perf_counter()
            if b - a < best[0]:
                best = (b - a, (a + b) / 2 - st)
        self.offset = best[1]
        return best[0]

    def to_perf(self, t_stream: float) -> float:
        return t_stream + self.offset

    def close(self) -> None:
        """Stop and close the stream, then terminate PortAudio (before anyone stops jackd)."""
        try:
            self.stream.stop()
            self.stream.close()
        finally:
            self.sd._terminate()


class ClockedSink:
    """A software audio clock: drains one block per period on time.perf_counter, writing a WAV or discarding.

    The DAC time of a block is the perf_counter time it is drained at, so `to_perf` is the identity.

    Args:
        ring: the ring to drain.
        samplerate: Hz.
        blocksize: frames per period.
        path: WAV file to write (float32), or None to discard.
    """

    def __init__(self, ring: Ring, samplerate: int, blocksize: int, path: Path | None = None) -> None:
        self.ring = ring
        self.samplerate = samplerate
        self.blocksize = blocksize
        self.path = path
        self.latency = 0.0
        self.buf = np.zeros((blocksize, ring.channels), dtype=np.float32)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._file: Any = None
        if path is not None:
            import soundfile as sf

            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = sf.SoundFile(str(path), "w", samplerate=samplerate, channels=ring.channels, subtype="FLOAT")

    def _run(self) -> None:
        period = self.blocksize / self.samplerate
        t = time.perf_counter()
        while not self._stop.is_set():
            t += period
            delay = t - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            elif delay < -0.5:  # the process was stopped; do not burst to catch up
                t = time.perf_counter()
            now = time.perf_counter()
            self.ring.read_into(self.buf, 0, now, now)
            if self._file is not None:
                self._file.write(self.buf)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="soundctm-clock", daemon=True)
        self._thread.start()

    def sync_clock(self, tries: int = 5) -> float:
        return 0.0

    def to_perf(self, t: float) -> float:
        return t

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        if self._file is not None:
            self._file.close()
