"""`soundctm-rt serve` as a child process, for the latency/soak benches and the tests: start it, wait until it
listens, and always stop it by PID (terminate, then kill)."""

from __future__ import annotations

import codecs
import contextlib
import os
import select
import subprocess
import sys
import time
import weakref
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
    out = _reader(proc)
    while out.fill(0.05):
        pass
    return out.take_all()[-limit:]


def read_rest(proc: subprocess.Popen[str]) -> str:
    """Everything the (exited or exiting) process wrote that nobody has read, up to the end of its stdout."""
    out = _reader(proc)
    while out.fill(None):
        pass
    return out.take_all()


def wait_for_lines(proc: subprocess.Popen[str], texts: tuple[str, ...], timeout: float) -> dict[str, str]:
    """Read the process's stdout until each of `texts` has appeared in some line, in any order (replies to
    requests that run concurrently may cross); returns the first line holding each. Raises TimeoutError."""
    out = _reader(proc)
    deadline = time.monotonic() + timeout
    found: dict[str, str] = {}
    seen = []
    while len(found) < len(texts):
        line = out.next_line(deadline)
        if line is None:
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


class _LineReader:
    """A child's stdout read straight from the pipe's descriptor, lines split here.

    Why not select() + TextIOWrapper.readline(): readline reads the pipe in 8 KiB blocks, so when the child
    wrote two lines before we read, the second one sits in Python's buffer while select() (which sees only the
    descriptor) reports nothing to read, and a waiter times out with the line it wants already received
    (seen in CI: Pure Data printed /pong and /ack back to back and the test saw only /pong).
    """

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.eof = False

    def fill(self, timeout: float | None) -> bool:
        """Read what the pipe holds, waiting up to `timeout` s (None: until data or EOF); False when nothing came."""
        if self.eof:
            return False
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        data = os.read(self.fd, 65536)
        if not data:
            self.eof = True
            self.text += self.decoder.decode(b"", final=True)
            return False
        self.text += self.decoder.decode(data)
        return True

    def next_line(self, deadline: float) -> str | None:
        """The next whole line (the last one may lack its newline at EOF); None at the deadline or at EOF."""
        while True:
            i = self.text.find("\n")
            if i >= 0:
                line, self.text = self.text[: i + 1], self.text[i + 1 :]
                return line
            if self.eof:
                line, self.text = self.text, ""
                return line or None
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.fill(left)

    def take_all(self) -> str:
        text, self.text = self.text, ""
        return text


_READERS: weakref.WeakKeyDictionary[subprocess.Popen[str], _LineReader] = weakref.WeakKeyDictionary()


def _reader(proc: subprocess.Popen[str]) -> _LineReader:
    """The one reader of this process's stdout (every helper here must go through it: it owns the buffer)."""
    r = _READERS.get(proc)
    if r is None:
        r = _READERS[proc] = _LineReader(proc)
    return r
