"""The audio callbacks allocate nothing.

The device callback is a numba cfunc that PortAudio calls directly (rtmix.pa_output_callback): its compiled
code is checked for allocation and interpreter calls on its normal path, and its effect is compared with
SlotTable.render's, called through ctypes exactly as PortAudio calls it, on voices that exercise every branch
(a scheduled start inside a block, a late one, a gap, a stop's fade).

The software clock (--output, --no-audio) calls SlotTable.render from Python: traced by tracemalloc over many
calls, after warm-up, in a fresh interpreter so no other thread allocates while tracing. tracemalloc's own
bookkeeping (the tuples get_traced_memory returns) shows up in the peak, so the same harness is first run with
a no-op function; the callback must not raise the peak or the current size beyond that by a single byte.
"""

from __future__ import annotations

import ctypes
import math
import re
import subprocess
import sys
import textwrap

import numpy as np
from numba import cfunc

from soundctm_rt.daemon.rtmix import PA_CALLBACK_SIG, SlotTable, pa_output_callback

PA_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p
)
SR = 48000


def _voices(table: SlotTable, bufs: list[np.ndarray]) -> None:
    """A scheduled start at frame 300 (the blocks below reach the DAC 2 frames after k * 256 / SR), a late
    start, a streaming voice with a gap, a voice whose stop comes while it plays."""
    specs = [
        (bufs[0], 1000, True, 302 / SR, math.nan),
        (bufs[1], 1000, True, -1.0, math.nan),
        (bufs[2], 100, False, math.nan, math.nan),
        (bufs[3], 1000, True, math.nan, 600 / SR),
    ]
    for i, (buf, avail, closed, t, stop) in enumerate(specs):
        s = table.free_slot()
        table.arm(s, i + 1, buf, avail, closed, (0.8, 0.6, 1.0), t, stop)


def test_device_callback_is_render_without_the_interpreter() -> None:
    call = PA_CALLBACK(pa_output_callback.address)
    rng = np.random.default_rng(0)
    bufs = [rng.uniform(-0.5, 0.5, 1000).astype(np.float32) for _ in range(4)]
    a, b = SlotTable(8, 2, SR, 240), SlotTable(8, 2, SR, 240)
    for t in (a, b):
        t.warmup()
        _voices(t, bufs)
    ud = a.callback_userdata(2)
    for k, flags in enumerate((0, 4, 0, 0)):  # an underflow-flagged block among them
        ti = np.array([0.0, k * 256 / SR, (k * 256 + 2) / SR])  # PaStreamCallbackTimeInfo: adc, current, dac
        out_a = np.full((256, 2), 7.0, dtype=np.float32)
        out_b = out_a.copy()
        assert call(None, out_a.ctypes.data, 256, ti.ctypes.data, flags, ud) == 0  # paContinue
        b.render(out_b, flags, ti[1], ti[2])
        np.testing.assert_array_equal(out_a, out_b)
        assert out_a.any()
    assert a.counters() == b.counters() and a.counters()["voice_gaps"] > 0 and a.counters()["underruns"] == 1
    np.testing.assert_array_equal(a.si, b.si)
    np.testing.assert_array_equal(a.sf, b.sf)
    for name in ("log_pos", "log_now", "log_dac", "log_grid"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.started(0)[0] == 300 and a.started(1)[2] > 0.9  # the scheduled start and the late one

    # what the compiled callback can call: no allocator, no interpreter outside the error paths numba adds.
    # Compiled afresh: a cached cfunc has no IR to inspect; this module holds _render's definition too.
    ir = cfunc(PA_CALLBACK_SIG, cache=False)(pa_output_callback._pyfunc).inspect_llvm()
    assert "define linkonce_odr" in ir and "_render" in ir
    called = set(re.findall(r'call [^@]*@"?([A-Za-z_.0-9]+)', ir))
    assert not {c for c in called if re.search(r"alloc|malloc|NRT_MemInfo_new|PyObject_|PyGILState", c, re.I)}, called
    assert "fence seq_cst" in ir


def test_callback_allocates_nothing() -> None:
    code = textwrap.dedent(
        """
        import math
        import tracemalloc
        import numpy as np
        from soundctm_rt.daemon.rtmix import SlotTable

        class TimeInfo:  # the fields PortAudio's callback gets, one per block, made before tracing
            def __init__(self, k):
                self.currentTime = 1.0 + k * 256 / 48000
                self.outputBufferDacTime = self.currentTime + 0.005

        class Flags:  # sounddevice.CallbackFlags keeps the int in _flags
            _flags = 4

        table = SlotTable(16, 2, 48000, 240)
        table.warmup()
        buf = np.zeros((256, 2), dtype=np.float32)
        blocks = [TimeInfo(k) for k in range(1010)]
        fl = Flags()
        voices = [np.full(1 << 20, 0.1, dtype=np.float32) for _ in range(8)]
        for i, v in enumerate(voices):  # scheduled starts, a stop's fade, a streaming voice that runs dry
            s = table.free_slot()
            t = 1.005 + i * 0.01 if i % 2 else math.nan
            table.arm(s, i + 1, v, len(v) if i != 3 else 20000, i != 3, (0.7, 0.7, 1.0), t, 1.2 if i == 5 else math.nan)

        def cb(outdata, frames, time_info, status):  # ClockedSink's call
            table.render(outdata, status._flags, time_info.currentTime, time_info.outputBufferDacTime)

        def noop(outdata, frames, time_info, status):
            return None

        def measure(fn, tis):
            c0 = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            for ti in tis:  # a list's iterator allocates nothing per item (range() would, past 256)
                fn(buf, 256, ti, fl)
            c1, peak = tracemalloc.get_traced_memory()
            return c1 - c0, peak - c0

        # warm-up through the same harness (same call depth): numba dispatch caches
        warm, timed = blocks[:10], blocks[10:]
        measure(cb, warm)
        measure(noop, warm)
        tracemalloc.start()
        base = measure(noop, timed)
        got = measure(cb, timed)
        tracemalloc.stop()
        c = table.counters()
        assert c["voice_gaps"] > 0 and c["underruns"] > 0 and c["callbacks"] >= 1000 and c["clock_jumps"] == 0, c
        assert buf.any() and all(table.started(s)[0] >= 0 for s in range(8))
        assert got == base, f"callback allocated: (current, peak) growth {got} vs no-op {base}"
        print("ok", got, base)
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ok")
