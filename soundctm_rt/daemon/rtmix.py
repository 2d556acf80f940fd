"""The real-time mixer: preallocated voice slots, and the compiled audio callback that schedules, mixes, fades
and pans them, sample-accurately, without the Python interpreter.

PortAudio calls `pa_output_callback`, a numba `cfunc`, with the slot table's arrays passed as addresses in its
userdata (python-rtmixer's design: the callback plays queued actions at their requested time). Per block:

1. the block's DAC time on the frame grid (`_grid`): PortAudio stamps a callback with the stream time at which
   it *ran* (JACK: `jack_frame_time()`), up to a few hundred microseconds after its cycle began; consecutive
   blocks are exactly `frames` apart, so the earliest stamp seen is the grid and later ones are jitter. A
   stamp off the grid by more than 3/4 of a block is a jump (an xrun, a restarted clock): the grid moves there
   and `clock_jumps` counts it. A stream clock that counts the device's frames (JACK: every stamp a whole
   number of frames) cannot drift against them, so its grid only ever moves to an earlier stamp; one that
   does not (a system clock against the DAC's crystal) follows each window's earliest stamp, up or down.
2. every armed slot: a voice with a requested start time `t` (stream clock) begins at frame offset
   `round((t - block DAC time) * rate)` inside the block where that lands (scsynth's rule); a start already past
   plays at offset 0 and records how late it is; a voice without one starts at offset 0 of the next block.
3. mixing: gain and constant-power pan, a linear fade when a /stop is due (at once, or at its own time), then
   clipping to [-1, 1]; a streaming voice whose samples are not there yet pauses and counts a gap.

Channels between threads (no locks): a slot is FREE (Python's), ARMED (the callback's: Python wrote every field,
then the state, behind a fence) or DONE (the callback finished; Python reads it, then frees it). While ARMED the
producer publishes samples (copy, fence, `avail`; `closed` after the last) and the control thread may request a
stop (`stop` or a stop time); the callback writes the play position, the first frame and its DAC time (fence
before the first frame, which is what Python polls). Fences are explicit (`_fence`, LLVM `fence seq_cst`), not
the GIL; the fields are aligned int64/float64 stores, single-copy atomic on x86-64 and AArch64. The Python side
keeps every voice's buffer alive until its slot is freed.

The callback allocates nothing, takes no locks, logs nothing and does no I/O (tests/test_ring_alloc.py checks
its compiled code for calls and traces the Python-called form with tracemalloc). The same compiled function
serves the software clock (`SlotTable.render`, for --output), so both paths are one code.
"""

from __future__ import annotations

import math

import numpy as np
from numba import carray, cfunc, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

# slot states
FREE, ARMED, DONE, RESERVED = 0, 1, 2, 3  # RESERVED: Python is filling it in (the callback skips it)

# int64 fields of a slot
S_STATE = 0
S_ID = 1  # the voice (job) id
S_BUF = 2  # address of the voice's float32 samples
S_CAP = 3  # the buffer's length, frames
S_AVAIL = 4  # samples published by the producer
S_CLOSED = 5  # 1: every sample is published
S_STOP = 6  # 1: fade out now (a /stop)
S_VPOS = 7  # samples played
S_FIRST = 8  # absolute output frame of the first sample; -1 before the start
S_FADE = 9  # fade samples left; -1: no fade running
S_GAPS = 10  # blocks in which the voice had no samples ready
NI = 12
# float64 fields of a slot
F_GL, F_GR, F_GAIN = 0, 1, 2  # left/right gains (constant-power pan) and the mono gain
F_T = 3  # requested start, stream clock (s); NaN: as soon as possible
F_STOP_T = 4  # requested stop (fade start), stream clock (s); NaN: none
F_FIRST_DAC = 5  # DAC time of the first sample, stream clock (s)
F_LATE = 6  # seconds the start came after the requested time (0: on time)
NF = 8

# int64 state of the table
POS = 0  # absolute output frame of the next block's first sample
CALLBACKS = 1
UNDERRUNS = 2  # callbacks the device flagged as output underflow (the callback itself was late)
STARVED_CALLBACKS = 3  # callbacks in which a streaming voice had no samples ready
STARVED_FRAMES = 4  # voice samples missing in those (summed over voices)
VOICE_GAPS = 5  # (voice, block) pairs with a gap
CLOCK_JUMPS = 6  # DAC stamps off the grid by more than JUMP blocks
GRID_POS = 7  # the frame at which the grid was anchored
GRID_SET = 8
WIN_N = 9  # callbacks in the current grid window
FADE_FRAMES = 10
DRIFTS = 11  # 1 once a stamp was not a whole number of frames: the stream clock may drift against the frames
N_STATE = 16
# float64 state
F_SR = 0  # Hz
G_DAC = 1  # DAC time of frame GRID_POS
WIN_MIN = 2  # smallest residual (frames) in the current window
N_FSTATE = 4

JUMP = 0.75  # a stamp further off the grid than this many blocks is a jump, not jitter
GRID_WINDOW = 256  # callbacks per drift window (1.4 s at 256 frames and 48 kHz)
LOG_SIZE = 4096  # callbacks logged (power of two): about 22 s of 256-frame blocks at 48 kHz
PA_OUTPUT_UNDERFLOW = 0x4  # paOutputUnderflow in PortAudio's PaStreamCallbackFlags
PA_CONTINUE = 0


@intrinsic
def _fence(typingctx):  # pragma: no cover - compiled
    """A sequentially consistent memory fence (LLVM `fence seq_cst`)."""

    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def _voidptr(typingctx, address):  # pragma: no cover - compiled
    """An integer address as a void pointer (for arrays handed to compiled code as addresses)."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(types.int64), codegen


@intrinsic
def _f32_at(typingctx, address, index):  # pragma: no cover - compiled
    """The float32 at `address + 4 * index` (a voice's sample, read through the address its slot holds)."""

    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], context.get_value_type(types.float32).as_pointer())
        return builder.load(builder.gep(ptr, [args[1]]))

    return types.float32(types.int64, types.int64), codegen


@njit(cache=True, nogil=True, _nrt=False)  # type: ignore[call-overload]
def _grid(st, fs, pos, dac, frames, sr):  # pragma: no cover - compiled
    """DAC time (stream clock) of frame `pos` on the frame grid, updating the grid with this block's stamp."""
    if st[GRID_SET] == 0:
        st[GRID_SET] = 1
        st[GRID_POS] = pos
        fs[G_DAC] = dac
        fs[WIN_MIN] = math.inf
        st[WIN_N] = 0
        return dac
    g = fs[G_DAC] + (pos - st[GRID_POS]) / sr
    r = (dac - g) * sr  # frames this stamp lies after the grid
    if r > JUMP * frames or r < -JUMP * frames:
        st[CLOCK_JUMPS] += 1
        st[GRID_POS] = pos
        fs[G_DAC] = dac
        fs[WIN_MIN] = math.inf
        st[WIN_N] = 0
        return dac
    if r < 0.0:  # an earlier phase than any seen: that is the grid
        st[GRID_POS] = pos
        fs[G_DAC] = dac
        return dac
    if st[DRIFTS] == 0:
        frac = dac * sr - math.floor(dac * sr + 0.5)
        if frac > 1e-3 or frac < -1e-3:
            st[DRIFTS] = 1
        else:
            return g  # a frame-counting clock: only an earlier stamp moves the grid
    if r < fs[WIN_MIN]:
        fs[WIN_MIN] = r
    st[WIN_N] += 1
    if st[WIN_N] >= GRID_WINDOW:  # drift: the grid moves up to the window's earliest stamp
        fs[G_DAC] += fs[WIN_MIN] / sr
        fs[WIN_MIN] = math.inf
        st[WIN_N] = 0
        g = fs[G_DAC] + (pos - st[GRID_POS]) / sr
    return g


# _nrt=False: without numba's runtime, array arguments are unboxed without a MemInfo each (malloc'd and freed
# per call otherwise), so a callback allocates nothing at all.
@njit(cache=True, nogil=True, _nrt=False)  # type: ignore[call-overload]
def _render(out, flags, now, dac, st, fs, si, sf, log_pos, log_now, log_dac, log_grid):  # pragma: no cover - compiled
    """Mix every armed slot into `out` [frames, channels] for the block whose first sample reaches the DAC at
    `dac` (stream clock, s); `now` is the callback's own time. Counts, logs and advances the frame position."""
    frames = out.shape[0]
    och = out.shape[1]
    sr = fs[F_SR]
    pos = st[POS]
    for i in range(frames):
        for c in range(och):
            out[i, c] = 0.0
    grid = _grid(st, fs, pos, dac, frames, sr)
    fade_frames = st[FADE_FRAMES]
    starved = 0
    for s in range(si.shape[0]):
        if si[s, S_STATE] != ARMED:
            continue
        _fence()  # acquire: every field written before the state is visible
        off = 0
        if si[s, S_FIRST] < 0:
            t = sf[s, F_T]
            stop_t = sf[s, F_STOP_T]
            if si[s, S_STOP] != 0 or (stop_t == stop_t and stop_t <= (t if t == t else grid)):
                _fence()
                si[s, S_STATE] = DONE  # stopped before it started: it never plays
                continue
            if si[s, S_AVAIL] == 0 and si[s, S_CLOSED] == 0:
                continue  # no sample yet: it starts with its first one (late, if its time has passed by then)
            if t == t:  # a requested start time
                d = (t - grid) * sr
                k = math.floor(d + 0.5)
                if k >= frames:
                    continue  # a later block
                if k < 0:
                    sf[s, F_LATE] = -d / sr
                    k = 0
                off = k
            sf[s, F_FIRST_DAC] = grid + off / sr
            _fence()  # the DAC time before the frame that announces the start
            si[s, S_FIRST] = pos + off
        closed = si[s, S_CLOSED]
        _fence()  # `closed` before `avail`: once closed is seen, the last avail is too
        avail = min(si[s, S_AVAIL], si[s, S_CAP])
        _fence()  # acquire: the samples below avail are written
        vpos = si[s, S_VPOS]
        n = frames - off
        if avail - vpos < n:
            if closed == 0:
                si[s, S_GAPS] += 1
                st[VOICE_GAPS] += 1
                starved += n - (avail - vpos)
            n = avail - vpos
        fade = si[s, S_FADE]
        fade_at = frames  # in-block index where a due stop starts the fade
        if fade < 0:
            if si[s, S_STOP] != 0:
                fade_at = off
            else:
                stop_t = sf[s, F_STOP_T]
                if stop_t == stop_t:
                    k = math.floor((stop_t - grid) * sr + 0.5)
                    if k < frames:
                        fade_at = max(k, off)
        addr = si[s, S_BUF]
        gl = sf[s, F_GL]
        gr = sf[s, F_GR]
        g = sf[s, F_GAIN]
        m = 0
        while m < n:
            j = off + m
            if fade < 0 and j >= fade_at:
                fade = fade_frames
            x = _f32_at(addr, vpos + m)
            if fade >= 0:
                if fade == 0:
                    break
                x = x * (fade / fade_frames)
                fade -= 1
            if och == 1:
                out[j, 0] += x * g
            else:
                out[j, 0] += x * gl
                out[j, 1] += x * gr
            m += 1
        if fade < 0 and fade_at < frames:
            fade = fade_frames  # due, but no samples were there to fade yet
        si[s, S_VPOS] = vpos + m
        si[s, S_FADE] = fade
        if fade == 0 or (closed != 0 and vpos + m >= avail):
            _fence()  # release: the fields above before the state that hands the slot back
            si[s, S_STATE] = DONE
    for i in range(frames):
        for c in range(och):
            v = out[i, c]
            if v > 1.0:
                out[i, c] = 1.0
            elif v < -1.0:
                out[i, c] = -1.0
    k = st[CALLBACKS]
    lmask = log_pos.shape[0] - 1
    log_pos[k & lmask] = pos
    log_now[k & lmask] = now
    log_dac[k & lmask] = dac
    log_grid[k & lmask] = grid
    if starved > 0:
        st[STARVED_CALLBACKS] += 1
        st[STARVED_FRAMES] += starved
    if flags & PA_OUTPUT_UNDERFLOW:
        st[UNDERRUNS] += 1
    st[POS] = pos + frames
    _fence()  # the log entry is complete before the count that releases it
    st[CALLBACKS] = k + 1


# userdata of the C callback: addresses and shapes of the table's arrays (SlotTable.callback_userdata)
UD_ST, UD_FS, UD_SI, UD_SF, UD_LOG_POS, UD_LOG_NOW, UD_LOG_DAC, UD_LOG_GRID, UD_SLOTS, UD_OUT_CH, UD_LOG_SIZE = range(
    11
)
N_UD = 11

# int callback(const void *input, void *output, unsigned long frameCount,
#              const PaStreamCallbackTimeInfo *timeInfo, PaStreamCallbackFlags statusFlags, void *userData)
# PaStreamCallbackTimeInfo is three doubles: inputBufferAdcTime, currentTime, outputBufferDacTime.
PA_CALLBACK_SIG = types.int32(types.voidptr, types.voidptr, types.uint64, types.voidptr, types.uint64, types.voidptr)


@cfunc(PA_CALLBACK_SIG, cache=True)
def pa_output_callback(inp, outp, frames, time_info, flags, userdata):  # pragma: no cover - compiled
    ud = carray(userdata, (N_UD,), np.int64)
    n_log = ud[UD_LOG_SIZE]
    st = carray(_voidptr(ud[UD_ST]), (N_STATE,), np.int64)
    fs = carray(_voidptr(ud[UD_FS]), (N_FSTATE,), np.float64)
    si = carray(_voidptr(ud[UD_SI]), (ud[UD_SLOTS], NI), np.int64)
    sf = carray(_voidptr(ud[UD_SF]), (ud[UD_SLOTS], NF), np.float64)
    log_pos = carray(_voidptr(ud[UD_LOG_POS]), (n_log,), np.int64)
    log_now = carray(_voidptr(ud[UD_LOG_NOW]), (n_log,), np.float64)
    log_dac = carray(_voidptr(ud[UD_LOG_DAC]), (n_log,), np.float64)
    log_grid = carray(_voidptr(ud[UD_LOG_GRID]), (n_log,), np.float64)
    out = carray(outp, (frames, ud[UD_OUT_CH]), np.float32)
    t = carray(time_info, (3,), np.float64)
    _render(out, flags, t[1], t[2], st, fs, si, sf, log_pos, log_now, log_dac, log_grid)
    return PA_CONTINUE


# --- the Python side's fenced stores and loads (compiled so that the fences are real) ---


@njit(cache=True, nogil=True)
def _arm(si, sf, s, ints, floats):  # pragma: no cover - compiled
    for f in range(ints.shape[0]):
        si[s, f] = ints[f]
    for f in range(floats.shape[0]):
        sf[s, f] = floats[f]
    _fence()  # release: the fields before the state that hands the slot to the callback
    si[s, S_STATE] = ARMED


@njit(cache=True, nogil=True)
def _push(si, s, buf, filled, src):  # pragma: no cover - compiled
    n = min(src.shape[0], buf.shape[0] - filled)
    for i in range(n):
        buf[filled + i] = src[i]
    _fence()  # release: the samples before the count that publishes them
    if s >= 0:
        si[s, S_AVAIL] = filled + n
    return n


@njit(cache=True, nogil=True)
def _store(si, s, field, value):  # pragma: no cover - compiled
    _fence()  # release: everything written before (samples, avail) is visible first
    si[s, field] = value


@njit(cache=True, nogil=True)
def _load_state(si, s):  # pragma: no cover - compiled
    state = si[s, S_STATE]
    _fence()  # acquire: what the callback wrote before the state is visible after it
    return state


@njit(cache=True, nogil=True)
def _started(si, sf, s):  # pragma: no cover - compiled
    """(first frame, its DAC time, seconds late) of slot s; first frame -1 before the start."""
    first = si[s, S_FIRST]
    _fence()  # acquire: the DAC time was written before the frame
    return first, sf[s, F_FIRST_DAC], sf[s, F_LATE]


class SlotTable:
    """The voice slots and the callback's state and log: every array the compiled callback touches.

    Args:
        slots: voices that can sound (or wait for their start time) at once.
        channels: output channels (1: mono gain; 2: constant-power pan).
        samplerate: Hz.
        fade_frames: length of a /stop fade, frames.
    """

    def __init__(self, slots: int, channels: int, samplerate: int, fade_frames: int) -> None:
        self.slots = slots
        self.channels = channels
        self.samplerate = samplerate
        self.si = np.zeros((slots, NI), dtype=np.int64)
        self.sf = np.zeros((slots, NF), dtype=np.float64)
        self.st = np.zeros(N_STATE, dtype=np.int64)
        self.fs = np.zeros(N_FSTATE, dtype=np.float64)
        self.fs[F_SR] = samplerate
        self.st[FADE_FRAMES] = max(1, fade_frames)
        self.log_pos = np.zeros(LOG_SIZE, dtype=np.int64)
        self.log_now = np.zeros(LOG_SIZE, dtype=np.float64)
        self.log_dac = np.zeros(LOG_SIZE, dtype=np.float64)
        self.log_grid = np.zeros(LOG_SIZE, dtype=np.float64)
        self.userdata = np.zeros(N_UD, dtype=np.int64)  # for the C callback; set by callback_userdata()
        self._silence = np.zeros(1, dtype=np.float32)  # the buffer of the warm-up voice

    def callback_userdata(self, out_channels: int) -> int:
        """Address of the userdata block that `pa_output_callback` reads (valid while this table lives)."""
        ud = self.userdata
        for slot, arr in (
            (UD_ST, self.st),
            (UD_FS, self.fs),
            (UD_SI, self.si),
            (UD_SF, self.sf),
            (UD_LOG_POS, self.log_pos),
            (UD_LOG_NOW, self.log_now),
            (UD_LOG_DAC, self.log_dac),
            (UD_LOG_GRID, self.log_grid),
        ):
            ud[slot] = arr.ctypes.data
        ud[UD_SLOTS], ud[UD_OUT_CH], ud[UD_LOG_SIZE] = self.slots, out_channels, LOG_SIZE
        return int(ud.ctypes.data)

    def render(self, out: np.ndarray, flags: int, now: float, dac: float) -> None:
        """One callback's work from Python (the software clock, tests): fill `out` [frames, channels] float32.

        Args:
            out: the block to fill.
            flags: PortAudio status flags (paOutputUnderflow is counted).
            now: the callback's time on the stream clock (time_info.currentTime), s.
            dac: when out[0] reaches the DAC, stream clock (time_info.outputBufferDacTime), s.

        Allocation-free: one compiled call on preallocated arrays.
        """
        _render(
            out,
            flags,
            now,
            dac,
            self.st,
            self.fs,
            self.si,
            self.sf,
            self.log_pos,
            self.log_now,
            self.log_dac,
            self.log_grid,
        )

    def warmup(self) -> None:
        """Compile every function (numba) before the stream starts, then reset."""
        out = np.zeros((4, self.channels), dtype=np.float32)
        ints = np.array([0, 0, self._silence.ctypes.data, 1, 1, 1, 0, 0, -1, -1, 0], dtype=np.int64)
        _arm(self.si, self.sf, 0, ints, np.array([1.0, 1.0, 1.0, 0.0, math.nan, 0.0, 0.0]))
        _push(self.si, -1, self._silence, 0, self._silence[:0])
        _store(self.si, 0, S_STOP, 0)
        self.render(out, 0, 0.0, 0.0)
        _started(self.si, self.sf, 0)
        _load_state(self.si, 0)
        self.si[:] = 0
        self.sf[:] = 0.0
        fade = self.st[FADE_FRAMES]
        self.st[:] = 0
        self.st[FADE_FRAMES] = fade
        self.fs[:] = 0.0
        self.fs[F_SR] = self.samplerate

    # --- counters and clock diagnostics (any thread) ---
    @property
    def position(self) -> int:
        """Absolute output frame of the next block."""
        return int(self.st[POS])

    def counters(self) -> dict[str, int]:
        s = self.st
        return {
            "callbacks": int(s[CALLBACKS]),
            "underruns": int(s[UNDERRUNS]),
            "starved_callbacks": int(s[STARVED_CALLBACKS]),
            "starved_frames": int(s[STARVED_FRAMES]),
            "voice_gaps": int(s[VOICE_GAPS]),
            "clock_jumps": int(s[CLOCK_JUMPS]),
        }

    def last_callback_time(self) -> float | None:
        """Stream-clock time (`currentTime`) of the latest callback, or None before the first."""
        k = int(self.st[CALLBACKS]) - 1
        return None if k < 0 else float(self.log_now[k & (LOG_SIZE - 1)])

    def dac_jitter_max(self) -> float:
        """How much later than the frame grid the device stamped its callbacks, at most over the log (s)."""
        k = int(self.st[CALLBACKS])
        if k == 0:
            return 0.0
        n = min(k, LOG_SIZE)
        idx = np.arange(k - n, k) & (LOG_SIZE - 1)
        return float(np.max(self.log_dac[idx] - self.log_grid[idx]))

    # --- the Python side of the slots (the caller serialises these; see mixer.Mixer) ---
    def free_slot(self) -> int:
        """A FREE slot's index, marked RESERVED, or -1 when every slot is taken."""
        free = np.flatnonzero(self.si[:, S_STATE] == FREE)
        if not len(free):
            return -1
        s = int(free[0])
        self.si[s, S_STATE] = RESERVED
        return s

    def arm(
        self,
        s: int,
        voice_id: int,
        buf: np.ndarray,
        avail: int,
        closed: bool,
        gains: tuple[float, float, float],
        t_start: float,
        t_stop: float,
    ) -> None:
        """Fill slot s (RESERVED) and hand it to the callback.

        Args:
            s: the slot.
            voice_id: the id replies use.
            buf: the voice's float32 samples [capacity]; the caller keeps it alive until the slot is freed.
            avail: samples of buf already written.
            closed: whether that is all of them.
            gains: (left, right, mono) linear gains.
            t_start: requested start, stream clock (s); NaN for as soon as possible.
            t_stop: requested stop, stream clock (s); NaN for none.
        """
        ints = np.array(
            [RESERVED, voice_id, buf.ctypes.data, len(buf), avail, int(closed), 0, 0, -1, -1, 0], dtype=np.int64
        )
        floats = np.array([*gains, t_start, t_stop, 0.0, 0.0], dtype=np.float64)
        _arm(self.si, self.sf, s, ints, floats)

    def push(self, s: int, buf: np.ndarray, filled: int, src: np.ndarray) -> int:
        """Copy `src` into buf[filled:] and publish it to slot s (-1: not armed yet); returns samples copied."""
        return int(_push(self.si, s, buf, filled, src))

    def close(self, s: int) -> None:
        _store(self.si, s, S_CLOSED, 1)

    def stop(self, s: int, t_stop: float = math.nan) -> None:
        """Fade slot s out now, or from stream time t_stop."""
        if math.isnan(t_stop):
            _store(self.si, s, S_STOP, 1)
        else:
            self.sf[s, F_STOP_T] = t_stop  # a float64 store; the callback reads it whole

    def started(self, s: int) -> tuple[int, float, float]:
        """(first frame or -1, its DAC time on the stream clock, seconds late)."""
        first, dac, late = _started(self.si, self.sf, s)
        return int(first), float(dac), float(late)

    def state(self, s: int) -> int:
        return int(_load_state(self.si, s))

    def gaps(self, s: int) -> int:
        return int(self.si[s, S_GAPS])

    def release(self, s: int) -> None:
        """Hand a DONE (or RESERVED, never armed) slot back as FREE."""
        self.si[s, S_STATE] = FREE
