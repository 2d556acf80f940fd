"""bench/process.py's readers of a child's stdout, against real child processes."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from soundctm_rt.bench.process import pending_output, read_rest, stop_process, wait_for_line, wait_for_lines


def _child(code: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_lines_written_together_are_all_seen() -> None:
    """The CI failure of the Pd test: two lines in one write, then silence; the second must not hide in a buffer."""
    p = _child("import sys, time; sys.stdout.write('pong\\nack 1\\nfail x\\n'); sys.stdout.flush(); time.sleep(30)")
    try:
        t0 = time.monotonic()
        assert wait_for_line(p, "pong", 10) == "pong\n"
        got = wait_for_lines(p, ("fail", "ack"), 10)  # already received: no waiting for more output
        assert got == {"fail": "fail x\n", "ack": "ack 1\n"}
        assert time.monotonic() - t0 < 5
    finally:
        stop_process(p)


def test_timeout_names_what_was_missing_and_what_came() -> None:
    p = _child("import sys, time; print('hello', flush=True); time.sleep(30)")
    try:
        with pytest.raises(TimeoutError, match=r"no 'bye'.*hello"):
            wait_for_line(p, "bye", 1)
    finally:
        stop_process(p)


def test_a_line_split_across_writes_and_a_last_line_without_newline() -> None:
    p = _child(
        "import sys, time\nsys.stdout.write('listen'); sys.stdout.flush(); time.sleep(0.3)\n"
        "sys.stdout.write('ing on 1\\n\\u00e9t\\u00e9'); sys.stdout.flush()"
    )
    try:
        assert wait_for_line(p, "listening on", 10) == "listening on 1\n"
        assert wait_for_line(p, "été", 10) == "été"  # EOF ends the last line
    finally:
        stop_process(p)


def test_pending_output_and_read_rest_return_the_unread_tail() -> None:
    p = _child("import sys; print('a'); print('b'); print('c', flush=True); sys.stdin.read()")
    try:
        assert wait_for_line(p, "a", 10) == "a\n"
        deadline = time.monotonic() + 10
        seen = ""
        while "c\n" not in seen and time.monotonic() < deadline:
            seen += pending_output(p)
        assert seen == "b\nc\n"
        assert pending_output(p) == ""  # no waiting when nothing is there
    finally:
        stop_process(p)
    q = _child("print('x'); print('y')")
    q.wait(timeout=10)
    assert wait_for_line(q, "x", 10) == "x\n"
    assert read_rest(q) == "y\n"


def test_output_nobody_waits_for_never_blocks_the_child() -> None:
    """A daemon that logs more than a pipe holds (64 KiB) while nobody reads must not block in a log call."""
    p = _child("print('start', flush=True)\nfor i in range(4000): print('log line %05d ' % i + 'x' * 90)\nprint('end')")
    try:
        wait_for_line(p, "start", 10)
        p.wait(timeout=20)  # ~390 KB written after "start": blocks for ever without the drain
        rest = read_rest(p)
        assert rest.endswith("end\n") and rest.count("log line") == 4000
    finally:
        stop_process(p)
