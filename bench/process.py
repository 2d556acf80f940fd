"""`soundctm-rt serve` as a child process, for the latency/soak benches and the tests: start it, wait until it
listens, and always stop it by PID (terminate, then kill)."""

from __future__ import annotations

import contextlib
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence


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


def wait_for_line(proc: subprocess.Popen[str], text: str, timeout: float) -> str:
    """Read the process's stdout until a line containing `text`; returns that line. Raises TimeoutError."""
    return wait_for_lines(proc, (text,), timeout)[text]


def pending_output(proc: subprocess.Popen[str], limit: int = 4000) -> str:
    """What the process has written to its stdout pipe so far and nobody has read (no waiting): the tail of a
    daemon's log for a failure message."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    lines = []
    while sel.select(timeout=0.05):
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
    return "".join(lines)[-limit:]


def wait_for_lines(proc: subprocess.Popen[str], texts: tuple[str, ...], timeout: float) -> dict[str, str]:
    """Read the process's stdout until each of `texts` has appeared in some line, in any order (replies to
    requests that run concurrently may cross); returns the first line holding each. Raises TimeoutError."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    found: dict[str, str] = {}
    seen = []
    while len(found) < len(texts) and time.monotonic() < deadline:
        if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
            break
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        for text in texts:
            if text in line and text not in found:
                found[text] = line
    missing = [t for t in texts if t not in found]
    if missing:
        what = repr(missing[0]) if len(missing) == 1 else repr(missing)
        raise TimeoutError(f"no {what} from {proc.args!r} within {timeout} s; got: {''.join(seen)[-2000:]}")
    return found
