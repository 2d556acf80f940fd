"""A single-producer single-consumer float32 ring buffer between the mixer thread and the audio callback.

The buffer is preallocated once: `[capacity, channels]` frames, capacity a power of two, so a position maps to
a slot with a bit mask. Positions are absolute frame counts (int64, they never wrap in practice: 2**63 frames
is millions of years of audio), so `write - read` is the fill level and a frame keeps its identity: the mixer
can ask "when did frame W reach the DAC?" and the callback log answers.

Both sides are numba-compiled (`_ring_write`, `_ring_read`): copy, then publish the index. The device's
reader is `pa_output_callback`, a C-callable function (numba `cfunc`) that PortAudio calls directly: it never
touches the Python interpreter, so it needs no GIL and cannot be held up by a thread that has it (a collection,
the worker's Python glue, a descheduled GIL holder on a busy core). Ordering between the two sides is by
explicit memory fences, not by the GIL: the writer fences between its copy and the store of WRITE, the reader
fences after loading WRITE and again before its store of READ (release/acquire on every architecture numba
targets). Positions are aligned int64 stores and loads, single-copy atomic on x86-64 and AArch64.

The reader only copies, zero-fills when the ring runs dry and counts; it allocates nothing, takes no locks,
logs nothing, does no I/O (tests/test_ring_alloc.py checks the compiled callback's code for calls).
"""

from __future__ import annotations

import numpy as np
from numba import carray, cfunc, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

# Slots of the shared int64 state vector.
WRITE = 0  # absolute frame position of the next frame the writer will publish
READ = 1  # absolute frame position of the next frame the reader will consume
CALLBACKS = 2  # callbacks served
STARVED_CALLBACKS = 3  # callbacks that found fewer frames than asked (ring starvation: the mixer was late)
STARVED_FRAMES = 4  # frames zero-filled for that reason
UNDERRUNS = 5  # callbacks the device flagged as output underflow (the callback itself was late)
N_STATE = 8

LOG_SIZE = 4096  # callback log entries kept (power of two): about 22 s of 256-frame blocks at 48 kHz
PA_OUTPUT_UNDERFLOW = 0x4  # paOutputUnderflow in PortAudio's PaStreamCallbackFlags


@intrinsic
def _fence(typingctx):  # pragma: no cover - compiled
    """A sequentially consistent memory fence (LLVM `fence seq_cst`)."""

    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def _voidptr(typingctx, address):  # pragma: no cover - compiled
    """An integer address as a void pointer (for arrays handed to the C callback as addresses)."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(types.int64), codegen


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


@njit(cache=True)
def _ring_write(buf, state, src):  # pragma: no cover - compiled
    cap = buf.shape[0]
    mask = cap - 1
    w = state[WRITE]
    space = cap - (w - state[READ])
    _fence()  # the reader's READ store (after its copy) happens-before our overwrite of those slots
    n = src.shape[0]
    if n > space:
        n = space
    ch = buf.shape[1]
    for i in range(n):
        j = (w + i) & mask
        for c in range(ch):
            buf[j, c] = src[i, c]
    _fence()  # the copy is visible before the index that publishes it
    state[WRITE] = w + n
    return n


# _nrt=False: without numba's runtime, array arguments are unboxed without a MemInfo each (6 x 56 bytes
# malloc'd and freed per call otherwise), so a callback allocates nothing at all.
@njit(cache=True, _nrt=False)  # type: ignore[call-overload]
def _ring_read(buf, state, out, flags, now, dac_time, log_pos, log_n, log_now, log_dac):  # pragma: no cover - compiled
    cap = buf.shape[0]
    mask = cap - 1
    frames = out.shape[0]
    r = state[READ]
    avail = state[WRITE] - r
    _fence()  # the frames the WRITE index published are visible before we copy them
    n = frames
    if avail < n:
        n = avail
    ch = buf.shape[1]
    och = out.shape[1]
    for i in range(n):
        j = (r + i) & mask
        for c in range(och):
            out[i, c] = buf[j, c % ch]
    for i in range(n, frames):
        for c in range(och):
            out[i, c] = 0.0
    k = state[CALLBACKS]
    lmask = log_pos.shape[0] - 1
    log_pos[k & lmask] = r
    log_n[k & lmask] = n
    log_now[k & lmask] = now
    log_dac[k & lmask] = dac_time
    if n < frames:
        state[STARVED_CALLBACKS] += 1
        state[STARVED_FRAMES] += frames - n
    if flags & PA_OUTPUT_UNDERFLOW:
        state[UNDERRUNS] += 1
    _fence()  # the copy and the log entry are complete before the indices that release them
    state[READ] = r + n
    state[CALLBACKS] = k + 1


# userdata of the C callback: addresses and shapes of the ring's arrays (Ring.userdata)
UD_BUF, UD_STATE, UD_LOG_POS, UD_LOG_N, UD_LOG_NOW, UD_LOG_DAC, UD_CAP, UD_CH, UD_OUT_CH, UD_LOG_SIZE = range(10)
N_UD = 10
PA_CONTINUE = 0


# int callback(const void *input, void *output, unsigned long frameCount,
#              const PaStreamCallbackTimeInfo *timeInfo, PaStreamCallbackFlags statusFlags, void *userData)
# PaStreamCallbackTimeInfo is three doubles: inputBufferAdcTime, currentTime, outputBufferDacTime.
PA_CALLBACK_SIG = types.int32(types.voidptr, types.voidptr, types.uint64, types.voidptr, types.uint64, types.voidptr)


@cfunc(PA_CALLBACK_SIG, cache=True)
def pa_output_callback(inp, outp, frames, time_info, flags, userdata):  # pragma: no cover - compiled
    ud = carray(userdata, (N_UD,), np.int64)
    buf = carray(_voidptr(ud[UD_BUF]), (ud[UD_CAP], ud[UD_CH]), np.float32)
    state = carray(_voidptr(ud[UD_STATE]), (N_STATE,), np.int64)
    n_log = ud[UD_LOG_SIZE]
    log_pos = carray(_voidptr(ud[UD_LOG_POS]), (n_log,), np.int64)
    log_n = carray(_voidptr(ud[UD_LOG_N]), (n_log,), np.int64)
    log_now = carray(_voidptr(ud[UD_LOG_NOW]), (n_log,), np.float64)
    log_dac = carray(_voidptr(ud[UD_LOG_DAC]), (n_log,), np.float64)
    out = carray(outp, (frames, ud[UD_OUT_CH]), np.float32)
    t = carray(time_info, (3,), np.float64)
    _ring_read(buf, state, out, flags, t[1], t[2], log_pos, log_n, log_now, log_dac)
    return PA_CONTINUE


@njit(cache=True)
def _find_dac(pos, log_pos, log_n, log_dac, count, rate):  # pragma: no cover - compiled
    """DAC time of absolute frame `pos` from the callback log, or -1.0 if it has not been played (yet/any more)."""
    size = log_pos.shape[0]
    lo = count - size
    if lo < 0:
        lo = 0
    k = count - 1
    while k >= lo:
        s = log_pos[k & (size - 1)]
        if s <= pos < s + log_n[k & (size - 1)]:
            return log_dac[k & (size - 1)] + (pos - s) / rate
        if s + log_n[k & (size - 1)] <= pos:
            return -1.0
        k -= 1
    return -1.0


class Ring:
    """The SPSC ring plus the callback log (where each callback started reading and its DAC time).

    Args:
        capacity: frames; rounded up to a power of two.
        channels: interleaved channels per frame.
    """

    def __init__(self, capacity: int, channels: int) -> None:
        cap = next_pow2(max(2, capacity))
        self.channels = channels
        self.buf = np.zeros((cap, channels), dtype=np.float32)
        self.state = np.zeros(N_STATE, dtype=np.int64)
        self.log_pos = np.zeros(LOG_SIZE, dtype=np.int64)
        self.log_n = np.zeros(LOG_SIZE, dtype=np.int64)
        self.log_now = np.zeros(LOG_SIZE, dtype=np.float64)
        self.log_dac = np.zeros(LOG_SIZE, dtype=np.float64)
        self.userdata = np.zeros(N_UD, dtype=np.int64)  # for the C callback; set by callback_userdata()

    def callback_userdata(self, out_channels: int) -> int:
        """Address of the userdata block that `pa_output_callback` reads (valid while this Ring lives)."""
        ud = self.userdata
        for slot, arr in (
            (UD_BUF, self.buf),
            (UD_STATE, self.state),
            (UD_LOG_POS, self.log_pos),
            (UD_LOG_N, self.log_n),
            (UD_LOG_NOW, self.log_now),
            (UD_LOG_DAC, self.log_dac),
        ):
            ud[slot] = arr.ctypes.data
        ud[UD_CAP], ud[UD_CH], ud[UD_OUT_CH], ud[UD_LOG_SIZE] = self.capacity, self.channels, out_channels, LOG_SIZE
        return int(ud.ctypes.data)

    @property
    def capacity(self) -> int:
        return int(self.buf.shape[0])

    def warmup(self) -> None:
        """Compile both sides (numba) before the stream starts, then reset."""
        out = np.zeros((4, self.channels), dtype=np.float32)
        _ring_write(self.buf, self.state, out)
        _ring_read(self.buf, self.state, out, 0, 0.0, 0.0, self.log_pos, self.log_n, self.log_now, self.log_dac)
        _find_dac(0, self.log_pos, self.log_n, self.log_dac, 1, 48000.0)
        self.state[:] = 0

    # --- writer side (one thread: the mixer) ---
    def write(self, src: np.ndarray) -> int:
        """Copy up to `len(src)` frames `[n, channels]` float32 in and publish them; returns frames written."""
        return int(_ring_write(self.buf, self.state, src))

    def fill(self) -> int:
        """Frames published and not yet read."""
        return int(self.state[WRITE] - self.state[READ])

    def space(self) -> int:
        return self.capacity - self.fill()

    @property
    def write_pos(self) -> int:
        return int(self.state[WRITE])

    def dac_time_of(self, pos: int, rate: float) -> float | None:
        """DAC time (stream clock) of absolute frame `pos`, once a callback has read it; else None."""
        t = _find_dac(pos, self.log_pos, self.log_n, self.log_dac, int(self.state[CALLBACKS]), float(rate))
        return None if t < 0 else float(t)

    def counters(self) -> dict[str, int]:
        s = self.state
        return {
            "callbacks": int(s[CALLBACKS]),
            "underruns": int(s[UNDERRUNS]),
            "starved_callbacks": int(s[STARVED_CALLBACKS]),
            "starved_frames": int(s[STARVED_FRAMES]),
        }

    # --- reader side (the audio callback) ---
    def last_callback_time(self) -> float | None:
        """Stream-clock time (`currentTime`) of the latest callback, or None before the first."""
        k = int(self.state[CALLBACKS]) - 1
        return None if k < 0 else float(self.log_now[k & (LOG_SIZE - 1)])

    def read_into(self, out: np.ndarray, flags: int, now: float, dac_time: float) -> None:
        """Fill `out` `[frames, channels]` from the ring, zero-filling what is missing; count and log.

        Args:
            out: the device buffer.
            flags: PortAudio status flags (paOutputUnderflow is counted).
            now: the callback's time on the stream clock (time_info.currentTime).
            dac_time: when out[0] will reach the DAC, stream clock (time_info.outputBufferDacTime).

        Allocation-free: one compiled call on preallocated arrays.
        """
        _ring_read(
            self.buf, self.state, out, flags, now, dac_time, self.log_pos, self.log_n, self.log_now, self.log_dac
        )
