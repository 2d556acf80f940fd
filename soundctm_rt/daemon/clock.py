"""The clocks a time tag crosses on its way to a sample: NTP (the client's) -> perf_counter (the daemon's) ->
the audio stream's clock (the DAC's).

```
OSC time tag (NTP, seconds since 1900) --ntp_to_unix--> time.time() --WallClock--> time.perf_counter()
    --output.from_perf--> stream clock (PortAudio's outputBufferDacTime) --callback--> frame in a block
```

Each link is measured by bracketing: read clock A, clock B, clock A back to back; B's reading lies between
the two A readings, so the offset is known to within half that bracket (`bracket_offset`). A clock that ticks
in steps (JACK's stream time is a whole number of frames, 20.8 µs at 48 kHz) is bracketed at the moment its
reading changes, which is when it equals the true time; reading it at a random moment would be up to a step
behind. The daemon re-measures every second, and the error it reports (`/status clock_error_ms`) adds half of
each bracket and how far each offset moved since the previous measurement (drift between measurements).
"""

from __future__ import annotations

import time
from collections.abc import Callable

NTP_UNIX_OFFSET = 2_208_988_800  # seconds from 1900-01-01 (NTP's epoch) to 1970-01-01 (Unix's)
NTP_ERA = 1 << 32  # NTP seconds wrap every 136 years (next in 2036)


def ntp_to_unix(timetag: int, now: float | None = None) -> float:
    """Unix time (seconds) of an OSC/NTP time tag: 32.32 fixed-point seconds since 1900.

    The era (the 32-bit seconds wrap in 2036) is the one that puts the tag nearest to `now` (default: time.time()).
    """
    now = time.time() if now is None else now
    t = (timetag >> 32) + (timetag & 0xFFFFFFFF) / NTP_ERA - NTP_UNIX_OFFSET
    return t + NTP_ERA * round((now - t) / NTP_ERA)


def unix_to_ntp(t: float) -> int:
    """The OSC/NTP time tag of a Unix time (seconds)."""
    s = t + NTP_UNIX_OFFSET
    sec = int(s // 1)
    frac = round((s - sec) * NTP_ERA)
    if frac >= NTP_ERA:
        sec, frac = sec + 1, frac - NTP_ERA
    return ((sec % NTP_ERA) << 32) | frac


def bracket_offset(clock: Callable[[], float], tries: int = 5, spins: int = 200) -> tuple[float, float]:
    """(offset, error): perf_counter() - clock(), and its error bound (half the tightest bracket), seconds.

    Each try reads perf_counter, clock, perf_counter until the clock's reading changes (at most `spins`
    times), and brackets the reading that changed: a stepping clock equals the true time at its step, a
    continuous one changes at every read. The tightest of `tries` brackets is kept.
    """
    best = (float("inf"), 0.0)
    for _ in range(tries):
        a0 = time.perf_counter()
        c0 = clock()
        c1 = c0
        for _ in range(spins):
            a1 = time.perf_counter()
            c1 = clock()
            b1 = time.perf_counter()
            if c1 != c0:
                break
            a0 = a1
        else:  # never changed within the spins: bracket the last reading alone
            a0 = a1
        width = b1 - a0
        if width < best[0]:
            best = (width, (a0 + b1) / 2 - c1)
    return best[1], best[0] / 2


class WallClock:
    """time.time() (what NTP tags are in) against time.perf_counter() (what the daemon stamps receipt with).

    `offset` is time.time() - perf_counter(); `error` its bound: half the bracket plus the last step between
    measurements (NTP slews the wall clock; perf_counter never jumps).
    """

    def __init__(self) -> None:
        self.offset = 0.0
        self.error = 0.0
        self._measured = False
        self.sync()

    def sync(self) -> None:
        """Re-measure the offset (a few microseconds of work)."""
        off, err = bracket_offset(time.time)
        off = -off  # bracket_offset gives perf - clock
        step = abs(off - self.offset) if self._measured else 0.0
        self.offset, self.error, self._measured = off, err + step, True

    def to_perf(self, unix: float) -> float:
        """perf_counter time of a Unix time."""
        return unix - self.offset
