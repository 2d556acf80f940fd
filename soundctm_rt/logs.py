"""The one logging set-up of the command line: the root callback of `soundctm-rt` (and the entry point
`python -m soundctm_rt.train`) calls `setup_logging` once per command; library code only logs."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever sys.stderr is when a record arrives (a test runner swaps it per
    command, and a stream bound at set-up would be closed by then)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:  # StreamHandler.setStream: the stream is always sys.stderr
        pass


def setup_logging(level: int, fmt: str = FORMAT) -> None:
    """Log records of soundctm_rt at `level` and above, and other libraries' at WARNING (or `level`, when
    higher), to stderr, one line each. A second call replaces the first one's handler; other handlers stay."""
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, StderrHandler)]:
        root.removeHandler(h)
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    root.setLevel(max(level, logging.WARNING))
    logging.getLogger("soundctm_rt").setLevel(level)


def tag_lines(fmt: str) -> None:
    """Reformat the lines of `setup_logging`'s handler (e.g. with a process's rank); nothing without one."""
    for h in logging.getLogger().handlers:
        if isinstance(h, StderrHandler):
            h.setFormatter(logging.Formatter(fmt))
