"""`soundctm-rt bench soak`: R triggers per second for M minutes on a JACK dummy clock; underruns, starved
callbacks (a playing voice without samples ready), clock jumps and the daemon's resident memory sampled over
time. `--cpu-load N` runs N busy-looping processes beside it (a machine with other work on it)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from soundctm_rt.daemon.client import OscClient

from .latency import format_causes, jack_daemon, percentiles, xrun_causes


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


@contextlib.contextmanager
def cpu_load(processes: int) -> Iterator[None]:
    """`processes` busy-looping Python processes for the duration of the block; stopped by PID."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=5)


def run_soak(
    bundle: Path | None,
    minutes: float,
    rate: float,
    samplerate: int,
    blocksize: int,
    generate_every: int = 10,
    sample_s: float = 10.0,
    load: int = 0,
) -> dict[str, Any]:
    from .machine import fingerprint

    series: list[dict[str, Any]] = []
    lat: list[float] = []
    fails: list[Any] = []
    with (
        jack_daemon(bundle, samplerate, blocksize) as (port, proc, jack),
        OscClient(port) as c,
        cpu_load(load),
    ):
        c.send("/soundctm/preload", "kick drum", 4)
        c.expect("/soundctm/done", 300)
        s0, x0 = c.status(), jack.xruns()
        t0 = time.monotonic()
        end = t0 + minutes * 60
        next_sample = t0
        i = 0
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_sample:
                s = c.status()
                series.append(
                    {
                        "t_s": round(now - t0, 1),
                        "rss_kib": _rss_kib(proc.pid),
                        **{
                            k: s[k] - s0[k]
                            for k in (
                                "underruns",
                                "starved_callbacks",
                                "starved_frames",
                                "voice_gaps",
                                "clock_jumps",
                                "completed",
                                "gc_collections",
                                "gc_gen2",
                            )
                        },
                        "gc_max_pause_ms": s["gc_max_pause_ms"],
                        "xruns_clock_late": jack.xruns()["clock"] - x0["clock"],
                    }
                )
                next_sample += sample_s
            if generate_every and i % generate_every == generate_every - 1:
                c.send("/soundctm/generate", "gritty 808 snare", i, 1)  # keeps the worker and the GIL busy too
            else:
                c.send("/soundctm/trigger", "kick drum")
            i += 1
            due = t0 + i / rate
            while (left := due - time.monotonic()) > 0:
                try:
                    addr, args = c.recv(left)
                except TimeoutError:
                    break
                if addr == "/soundctm/done":
                    lat.append(float(args[1]))
                elif addr == "/soundctm/fail":
                    fails.append(args)
        time.sleep(1.0)
        s1, x1 = c.status(), jack.xruns()
        rss_end = _rss_kib(proc.pid)
    warm = [p["rss_kib"] for p in series if p["t_s"] >= min(60.0, minutes * 30)] or [series[0]["rss_kib"]]
    return {
        "bench": "soak",
        "minutes": minutes,
        "rate_per_s": rate,
        "samplerate": samplerate,
        "blocksize": blocksize,
        "cpu_load_processes": load,
        "bundle": str(bundle) if bundle else "default",
        "jobs_sent": i,
        "failures": len(fails),
        "underruns": s1["underruns"] - s0["underruns"],
        **xrun_causes(x0, x1),
        "starved_callbacks": s1["starved_callbacks"] - s0["starved_callbacks"],
        "starved_frames": s1["starved_frames"] - s0["starved_frames"],
        "voice_gaps": s1["voice_gaps"] - s0["voice_gaps"],
        "clock_jumps": s1["clock_jumps"] - s0["clock_jumps"],
        "late": s1["late"] - s0["late"],
        "gc_gen2": s1["gc_gen2"] - s0["gc_gen2"],
        "gc_max_pause_ms": s1["gc_max_pause_ms"],
        "latency_ms": percentiles(lat) if lat else None,
        "rss_kib_first_warm": warm[0],
        "rss_kib_end": rss_end,
        "rss_growth_kib_after_warmup": rss_end - warm[0],
        "series": series,
        "machine": fingerprint(),
    }


def format_soak(r: dict[str, Any]) -> str:
    lat = r["latency_ms"] or {}
    return (
        f"soak {r['minutes']} min at {r['rate_per_s']}/s ({r['jobs_sent']} jobs, {r['failures']} failed, "
        f"{r['cpu_load_processes']} busy processes beside): "
        f"underruns {r['underruns']} ({format_causes(r)}), "
        f"starved callbacks {r['starved_callbacks']} ({r['starved_frames']} frames), "
        f"voice gaps {r['voice_gaps']}, clock jumps {r['clock_jumps']}; "
        f"GC: {r['gc_gen2']} full collections, longest pause "
        f"{r['gc_max_pause_ms']:.2f} ms; latency p50 {lat.get('p50', float('nan')):.2f} ms "
        f"p99 {lat.get('p99', float('nan')):.2f} ms; RSS {r['rss_kib_first_warm']} -> {r['rss_kib_end']} KiB "
        f"({r['rss_growth_kib_after_warmup']:+d} KiB after warm-up)"
    )


def soak(
    minutes: float = typer.Option(10.0, min=0.05, help="How long."),
    rate: float = typer.Option(2.0, min=0.1, max=200.0, help="Jobs per second (every 10th a 1-step generate)."),
    bundle: Path | None = typer.Option(None, help="Bundle (default: the shipped model)."),
    blocksize: int = typer.Option(256, min=16, max=8192, help="JACK period and daemon block, frames."),
    samplerate: int = typer.Option(48000, min=8000, max=384000, help="Hz."),
    cpu_load_processes: int = typer.Option(
        0, "--cpu-load", min=0, max=64, help="Busy-looping processes to run beside the daemon (other work)."
    ),
    json_path: Path | None = typer.Option(None, "--json", help="Write the report (with the time series) as JSON."),
) -> None:
    """Underruns, starved callbacks, clock jumps and memory over time at R triggers per second."""
    r = run_soak(bundle, minutes, rate, samplerate, blocksize, load=cpu_load_processes)
    typer.echo(format_soak(r))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(r, indent=2) + "\n")
