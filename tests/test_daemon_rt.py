"""Real-time hygiene of the daemon: xrun attribution from jackd's log, the worker's lowered priority, GC pauses."""

from __future__ import annotations

import ast
import gc
import os
import sys
import threading
from pathlib import Path

import pytest

from soundctm_rt.bench.jack import JackDummy, xrun_counts
from soundctm_rt.daemon.gcwatch import GCWatch
from soundctm_rt.daemon.worker import lower_thread_priority

JACKD_LOGS = Path(__file__).resolve().parent / "fixtures" / "jackd"
RUNTIME = Path(__file__).resolve().parent.parent / "soundctm_rt"


def test_no_runtime_module_imports_the_bench_harness() -> None:
    """The JACK harness and the serve-process helpers live in bench/ (installed as soundctm_rt.bench)."""
    for path in RUNTIME.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any("bench" in n.split(".") for n in names), f"{path}: imports {names}"


def test_xruns_are_attributed_to_the_clock_or_the_graph(tmp_path: Path) -> None:
    log = tmp_path / "jackd.log"
    jack = JackDummy(log_path=log)
    assert jack.xruns() == {"clock": 0, "clock_max_late_us": 0, "graph": 0}  # no log yet
    log.write_text(
        "JACK server starting in realtime mode with priority 10\n"
        "JackTimedDriver::Process XRun = 88 usec\n"
        "JackEngine::XRun: client = soundctm was not finished, state = Triggered\n"
        "JackTimedDriver::Process XRun = 5694 usec\n"
        "no message buffer overruns\n"
    )
    assert jack.xruns() == {"clock": 2, "clock_max_late_us": 5694, "graph": 1}


@pytest.mark.parametrize(
    "log,counts",
    [
        # jackd -S (as JackDummy runs it): the driver waits for a slow client, so its cycles run late and the
        # dummy driver reports its own late wake-ups, 19 us to 700 ms
        ("dummy_sync_slow_client.log", {"clock": 4, "clock_max_late_us": 700226, "graph": 0}),
        # jackd without -S: the driver goes on, and each cycle the client misses is the graph's (an XRun line,
        # a Process error line, or both)
        ("dummy_async_slow_client.log", {"clock": 0, "clock_max_late_us": 0, "graph": 20}),
    ],
)
def test_xrun_counts_of_recorded_jackd_logs(log: str, counts: dict[str, float]) -> None:
    """Golden logs: jackd 1.9.21's own output (dummy driver, 48 kHz, 256 frames, non-realtime) with a PortAudio
    client whose callback overran a few cycles."""
    text = (JACKD_LOGS / log).read_text()
    assert text.startswith("jackdmp 1.9.21\n")
    assert xrun_counts(text) == counts
    assert JackDummy(log_path=JACKD_LOGS / log).xruns() == counts


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_worker_thread_lowers_only_its_own_priority() -> None:
    got: dict[str, int] = {}

    def body() -> None:
        tid = threading.get_native_id()
        before = os.getpriority(os.PRIO_PROCESS, tid)
        assert lower_thread_priority(5)
        got["delta"] = os.getpriority(os.PRIO_PROCESS, tid) - before

    t = threading.Thread(target=body)
    main_before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    t.start()
    t.join()
    assert got["delta"] == min(5, 19 - main_before)  # nice saturates at 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_before


def test_gcwatch_counts_collections_and_pauses() -> None:
    w = GCWatch()
    w.install()
    try:
        gc.collect()
        for _ in range(20_000):  # reference cycles trigger generation-0 collections
            a: list = []
            a.append(a)
    finally:
        w.uninstall()
    c = w.counters()
    assert c["gc_gen2"] >= 1 and c["gc_collections"] > c["gc_gen2"] and c["gc_max_pause_ms"] > 0
    n = c["gc_collections"]
    gc.collect()  # after uninstall: not counted
    assert w.counters()["gc_collections"] == n
