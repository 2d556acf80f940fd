"""The audio callbacks allocate nothing.

The device callback is a numba cfunc that PortAudio calls directly (ring.pa_output_callback): its compiled
code is checked for allocation and interpreter calls on its normal path, and its effect is compared with
Ring.read_into's, called through ctypes exactly as PortAudio calls it.

The software clock (--output, --no-audio) calls Ring.read_into from Python: traced by tracemalloc over many
calls, after warm-up, in a fresh interpreter so no other thread allocates while tracing. tracemalloc's own
bookkeeping (the tuples get_traced_memory returns) shows up in the peak, so the same harness is first run with
a no-op function; the callback must not raise the peak or the current size beyond that by a single byte.
"""

from __future__ import annotations

import ctypes
import re
import subprocess
import sys
import textwrap

import numpy as np
from numba import cfunc

from soundctm_rt.daemon.ring import PA_CALLBACK_SIG, Ring, pa_output_callback

PA_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p
)


def test_device_callback_is_read_into_without_the_interpreter() -> None:
    call = PA_CALLBACK(pa_output_callback.address)
    a, b = Ring(1024, 1), Ring(1024, 1)
    for r in (a, b):
        r.warmup()
        r.write(np.arange(300, dtype=np.float32)[:, None] + 1)
    ud = a.callback_userdata(2)
    ti = np.array([0.0, 1.25, 1.255])  # PaStreamCallbackTimeInfo: adc, current, dac
    for flags in (0, 4, 0):  # a full block, an underflow-flagged one that starves, an empty one
        out_a = np.full((256, 2), 7.0, dtype=np.float32)
        out_b = out_a.copy()
        assert call(None, out_a.ctypes.data, 256, ti.ctypes.data, flags, ud) == 0  # paContinue
        b.read_into(out_b, flags, 1.25, 1.255)
        np.testing.assert_array_equal(out_a, out_b)
    assert (
        a.counters() == b.counters() == {"callbacks": 3, "underruns": 1, "starved_callbacks": 2, "starved_frames": 468}
    )
    for name in ("log_pos", "log_n", "log_now", "log_dac"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.dac_time_of(257, 48000.0) == b.dac_time_of(257, 48000.0) == 1.255 + 1 / 48000

    # what the compiled callback can call: no allocator, no interpreter outside the error paths numba adds.
    # Compiled afresh: a cached cfunc has no IR to inspect; this module holds _ring_read's definition too.
    ir = cfunc(PA_CALLBACK_SIG, cache=False)(pa_output_callback._pyfunc).inspect_llvm()
    assert "define linkonce_odr" in ir and "_ring_read" in ir
    called = set(re.findall(r'call [^@]*@"?([A-Za-z_.0-9]+)', ir))
    assert not {c for c in called if re.search(r"alloc|malloc|NRT_MemInfo_new|PyObject_", c, re.I)}, called
    assert "fence seq_cst" in ir


def test_callback_allocates_nothing() -> None:
    code = textwrap.dedent(
        """
        import itertools
        import tracemalloc
        import numpy as np
        from soundctm_rt.daemon.ring import Ring

        class TimeInfo:  # the fields PortAudio's callback gets
            currentTime = 1.0
            outputBufferDacTime = 1.005

        class Flags:  # sounddevice.CallbackFlags keeps the int in _flags
            _flags = 4

        ring = Ring(1 << 16, 2)
        ring.warmup()
        buf = np.zeros((256, 2), dtype=np.float32)
        ti, fl = TimeInfo(), Flags()

        def cb(outdata, frames, time_info, status):  # ClockedSink's call
            ring.read_into(outdata, status._flags, time_info.currentTime, time_info.outputBufferDacTime)

        def noop(outdata, frames, time_info, status):
            return None

        def measure(fn, n):
            it = itertools.repeat(None, n)  # range() would allocate its ints > 256
            c0 = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            for _ in it:
                fn(buf, 256, ti, fl)
            c1, peak = tracemalloc.get_traced_memory()
            return c1 - c0, peak - c0

        # warm-up through the same harness (same call depth): numba dispatch caches, the starved path
        measure(cb, 50)
        measure(noop, 50)
        ring.write(np.ones((40 * 256, 2), dtype=np.float32))  # 40 full reads, then starved (zero-fill) reads
        tracemalloc.start()
        base = measure(noop, 1000)
        got = measure(cb, 1000)
        tracemalloc.stop()
        c = ring.counters()
        assert c["starved_callbacks"] > 0 and c["underruns"] > 0 and c["callbacks"] >= 1000, c
        assert got == base, f"callback allocated: (current, peak) growth {got} vs no-op {base}"
        print("ok", got, base)
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ok")
