"""`soundctm-rt serve` as a child process, for the latency/soak benches and the tests: start it, wait until it
listens, and always stop it by PID (terminate, then kill)."""

from __future__ import annotations

import codecs
import contextlib
import os
import subprocess
import sys
import threading
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
    _reader(p)  # drained from now on: a daemon's log never fills the pipe, and its tail stays readable
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
    """What the process has written to its stdout so far and nobody has read (waiting 0.1 s for more): the tail
    of a daemon's log for a failure message."""
    return _reader(proc).take_all(settle=0.1)[-limit:]


def read_rest(proc: subprocess.Popen[str], timeout: float = 30.0) -> str:
    """Everything the (exited or exiting) process wrote that nobody has read, up to the end of its stdout."""
    return _reader(proc).take_all(until_eof=timeout)


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
    """A child's stdout, drained by a thread of its own from the pipe's descriptor until EOF; lines split here.

    Why a thread: a daemon that logs while nobody waits for a line would otherwise fill the 64 KiB pipe and
    block in a log call (on its OSC or audio thread). Why not select() + TextIOWrapper.readline(): readline
    reads in 8 KiB blocks, so two lines written before we read left the second in Python's buffer while
    select() on the descriptor saw nothing, and a waiter timed out with its line already received (the CI
    failure of the Pd test: /pong and /ack printed back to back, only /pong seen). Unread text beyond
    `MAX_CHARS` is dropped from the front (a log's tail is what a failure message needs).
    """

    MAX_CHARS = 1 << 22

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        self.text = ""
        self.eof = False
        self.cond = threading.Condition()
        threading.Thread(target=self._drain, name=f"stdout-of-{proc.pid}", daemon=True).start()

    def _drain(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while True:
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # closed under us (the Popen object went away)
                data = b""
            with self.cond:
                self.text += decoder.decode(data, final=not data)
                if len(self.text) > self.MAX_CHARS:
                    self.text = self.text[-self.MAX_CHARS :]
                self.eof = not data
                self.cond.notify_all()
            if not data:
                return

    def next_line(self, deadline: float) -> str | None:
        """The next whole line (the last one may lack its newline at EOF); None at the deadline or at EOF."""
        with self.cond:
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
                self.cond.wait(left)

    def take_all(self, settle: float = 0.0, until_eof: float | None = None) -> str:
        """All unread text, after `settle` s without new output, or (until_eof) once the pipe closed."""
        with self.cond:
            if until_eof is not None:
                self.cond.wait_for(lambda: self.eof, until_eof)
            else:
                n = -1
                while settle > 0 and not self.eof and len(self.text) != n:
                    n = len(self.text)
                    self.cond.wait(settle)
            text, self.text = self.text, ""
            return text


_READERS: weakref.WeakKeyDictionary[subprocess.Popen[str], _LineReader] = weakref.WeakKeyDictionary()
_READERS_LOCK = threading.Lock()


def _reader(proc: subprocess.Popen[str]) -> _LineReader:
    """The one reader of this process's stdout (every helper here must go through it: it owns the buffer)."""
    with _READERS_LOCK:
        r = _READERS.get(proc)
        if r is None:
            r = _READERS[proc] = _LineReader(proc)
        return r
