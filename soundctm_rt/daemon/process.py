"""`soundctm-rt serve` as a child process, for the latency/soak benches and the tests: start it, wait until it
listens, and always stop it by PID (terminate, then kill)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator, Sequence

from .jack import wait_for_line


@contextlib.contextmanager
def serve_process(
    args: Sequence[str], env: dict[str, str] | None = None, timeout: float = 120.0
) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """Run `soundctm-rt serve --port 0 ARGS`; yields (the port it bound, the process)."""
    cmd = [sys.executable, "-m", "soundctm_rt", "serve", "--port", "0", *args]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line = wait_for_line(p, "listening on", timeout)
        yield int(line.strip().rsplit(":", 1)[1]), p
    finally:
        stop_process(p)


def stop_process(p: subprocess.Popen[str], timeout: float = 5.0) -> None:
    """Terminate a child process, killing it if it does not exit within `timeout` seconds."""
    if p.poll() is not None:
        return
    p.terminate()
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
