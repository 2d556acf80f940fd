"""A JACK2 dummy server as a real audio clock without a sound card (`bench latency/soak` and the tests).

`jackd -S -d dummy -r RATE -p PERIOD -w USECS`: synchronous mode (-S) so PortAudio's DAC time is one period
ahead, not two; `-w` must equal the period in microseconds, or the dummy driver sleeps its default 21.3 ms per
cycle and the "clock" runs slow. A named server (-n) keeps several runs apart; clients find it through
JACK_DEFAULT_SERVER. JACK_NO_AUDIO_RESERVATION=1 skips the D-Bus device reservation (no session bus here).
Start jackd before the process that imports sounddevice; stop that process (PortAudio terminated) first.

Every JACK xrun reaches a PortAudio client as an output underflow, whoever caused it, so the server's log is
kept and `xrun_counts()` tells them apart: "JackTimedDriver::Process XRun = N usec" is the dummy driver's own timer
waking N µs late (the clock, not any client: a busy or virtualised machine delays even a SCHED_FIFO thread),
any other xrun or process error is the graph's (a client did not finish its cycle in time).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

CLOCK_XRUN = re.compile(r"JackTimedDriver::Process XRun = (\d+) usec")
GRAPH_XRUN = re.compile(r"XRun|not finished|process error|ProcessGraph.*error", re.IGNORECASE)


class JackError(RuntimeError):
    pass


def xrun_counts(log: str) -> dict[str, float]:
    """Xruns in a jackd log's text: `clock` (the dummy driver's timer woke late), `clock_max_late_us` (the
    latest of those wake-ups, µs) and `graph` (lines of any other xrun or process error: a client missed its
    cycle)."""
    late = [int(m) for m in CLOCK_XRUN.findall(log)]
    graph = sum(1 for line in log.splitlines() if GRAPH_XRUN.search(line) and not CLOCK_XRUN.search(line))
    return {"clock": len(late), "clock_max_late_us": max(late, default=0), "graph": graph}


def jack_available() -> str | None:
    """None if jackd and jack_wait are installed, else what is missing."""
    missing = [t for t in ("jackd", "jack_wait") if shutil.which(t) is None]
    return None if not missing else f"{', '.join(missing)} not installed (apt-get install jackd2)"


class JackDummy:
    """Start a named jackd dummy server; stop it by its PID.

    Args:
        rate: sample rate, Hz.
        period: frames per cycle.
        name: server name (clients: JACK_DEFAULT_SERVER=name).
        realtime: -R (SCHED_FIFO when permitted) or -r (no realtime scheduling).
        log_path: where jackd's output goes (default: a temporary file, removed by __exit__).
    """

    def __init__(
        self,
        rate: int = 48000,
        period: int = 256,
        name: str | None = None,
        realtime: bool = True,
        log_path: Path | None = None,
    ) -> None:
        self.rate = rate
        self.period = period
        self.name = name or f"soundctm{os.getpid()}"
        self.realtime = realtime
        self._own_log = log_path is None
        if log_path is None:
            fd, tmp = tempfile.mkstemp(prefix="jackd-", suffix=".log")
            os.close(fd)
            log_path = Path(tmp)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        """Environment for a client process of this server."""
        return {
            **os.environ,
            "JACK_DEFAULT_SERVER": self.name,
            "JACK_NO_AUDIO_RESERVATION": "1",
            "JACK_NO_START_SERVER": "1",
        }

    def start(self, timeout: float = 10.0) -> JackDummy:
        usecs = round(self.period / self.rate * 1e6)
        cmd = [
            "jackd",
            "-n",
            self.name,
            "-S",
            "-R" if self.realtime else "-r",
            "-d",
            "dummy",
            "-r",
            str(self.rate),
            "-p",
            str(self.period),
            "-w",
            str(usecs),
        ]
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env())
        try:
            subprocess.run(
                ["jack_wait", "-w", "-s", self.name, "-t", str(int(timeout))],
                env=self.env(),
                check=True,
                capture_output=True,
                timeout=timeout + 2,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            self.stop()
            raise JackError(f"jackd did not start: {' '.join(cmd)}") from e
        if self.proc.poll() is not None:
            raise JackError(f"jackd exited with {self.proc.returncode}")
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def xruns(self) -> dict[str, float]:
        """Xruns in the server's log so far: `clock` (the dummy driver woke late), `clock_max_late_us`, and
        `graph` (a client missed its cycle, or another process error)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            text = ""
        return xrun_counts(text)

    def __enter__(self) -> JackDummy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._own_log:
            self.log_path.unlink(missing_ok=True)
