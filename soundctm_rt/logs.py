"""The one logging set-up of the command line: the root callback of `soundctm-rt` (and the entry point
`python -m soundctm_rt.train`) calls `setup_logging` once per command; library code only logs."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

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


class _LineBar:
    """task_bar without tqdm (a runtime-only install): one log line per tenth of the work (none when silent)."""

    def __init__(self, total: int, desc: str, log: logging.Logger, level: int, silent: bool = False) -> None:
        self.total, self.desc, self.log, self.level, self.silent = max(total, 1), desc, log, level, silent
        self.n, self._shown = 0, 0

    def update(self, n: int = 1) -> None:
        self.n += n
        tenth = 10 * self.n // self.total
        if tenth > self._shown and not self.silent:
            self._shown = tenth
            self.log.log(self.level, "%s: %d/%d", self.desc, self.n, self.total)

    def close(self) -> None:
        pass

    def __enter__(self) -> _LineBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def task_bar(total: int, desc: str, log: logging.Logger, level: int = logging.INFO) -> Any:
    """A progress bar over a command's `total` work items on stderr, shown while `log` is enabled for `level`
    (INFO for the commands that log progress, WARNING for one that shows a bar unless `-q`). tqdm when it is
    installed (the train and export extras; sparse updates when stderr is not a terminal), else a log line per
    tenth of the work. Use as a context manager or call update() and close()."""
    if not log.isEnabledFor(level):
        return _LineBar(total, desc, log, level, silent=True)
    try:
        from tqdm import tqdm
    except ImportError:
        return _LineBar(total, desc, log, level)
    return tqdm(total=total, desc=desc, mininterval=0.5 if sys.stderr.isatty() else 60.0, dynamic_ncols=True)
