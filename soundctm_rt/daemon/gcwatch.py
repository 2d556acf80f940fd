"""Garbage-collector pauses, frozen and measured.

A collection holds the GIL. The audio callback is compiled and never needs it, but the OSC thread does: while
the collector runs, a message's receipt stamp and an untimed start wait, and a late time-tagged start can
follow. The daemon therefore freezes everything it allocated at start-up (`gc.freeze`: the model, the backends'
objects, the caches), so later collections scan only what came after, and it measures every collection's pause
so that status can tell a GC stall from other causes of a late start.
"""

from __future__ import annotations

import gc
import threading
import time
from typing import Any


class GCWatch:
    """Counts collections per generation and keeps the longest pause (ms) since install()."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.max_pause_ms = 0.0
        self.total_pause_ms = 0.0
        self._t0: dict[int, float] = {}  # thread id -> start; collections run in whichever thread allocates
        self._installed = False

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        tid = threading.get_ident()
        if phase == "start":
            self._t0[tid] = time.perf_counter()
            return
        t0 = self._t0.pop(tid, None)
        if t0 is None:
            return
        ms = (time.perf_counter() - t0) * 1e3
        self.collections[int(info.get("generation", 0))] += 1
        self.total_pause_ms += ms
        if ms > self.max_pause_ms:
            self.max_pause_ms = ms

    def install(self) -> None:
        if not self._installed:
            gc.callbacks.append(self._on_gc)
            self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            gc.callbacks.remove(self._on_gc)
            self._installed = False

    def counters(self) -> dict[str, Any]:
        return {
            "gc_collections": sum(self.collections),
            "gc_gen2": self.collections[2],
            "gc_max_pause_ms": round(self.max_pause_ms, 3),
        }


def freeze_startup_heap() -> int:
    """Collect once, then move every surviving object to the permanent generation; returns how many."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
