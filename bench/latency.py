"""`soundctm-rt bench latency`: trigger -> first sample at the DAC, under JACK's dummy clock.

Starts `jackd -S -d dummy` and a `soundctm-rt serve` process on it, then sends, one at a time with a random
gap (so arrivals fall at every phase of the audio period): N 1-step generates (a new seed each, so nothing is
cached) and N triggers of a preloaded prompt. The daemon measures each job itself (OSC receipt -> the DAC
time of the voice's first sample) and reports it in /done; this bench collects those and the daemon's
underrun/starvation counters. Warm-up jobs are sent first and not counted.
"""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import typer

from soundctm_rt.daemon.client import OscClient
from soundctm_rt.daemon.jack import JackDummy, jack_available
from soundctm_rt.daemon.process import serve_process


@contextlib.contextmanager
def jack_daemon(
    bundle: Path | None, samplerate: int, blocksize: int, lead: float, extra: list[str] | None = None
) -> Iterator[tuple[int, subprocess.Popen[str], JackDummy]]:
    """jackd dummy + a daemon process on it; yields (daemon port, process, server). Stops both by PID, daemon
    first."""
    why = jack_available()
    if why:
        raise typer.BadParameter(f"bench needs JACK: {why}")
    with JackDummy(samplerate, blocksize) as jack:
        args = [
            "--samplerate",
            str(samplerate),
            "--blocksize",
            str(blocksize),
            "--lead",
            str(lead),
            "--max-queue",
            "64",
            *(extra or []),
        ]
        if bundle is not None:
            args += ["--bundle", str(bundle)]
        with serve_process(args, env=jack.env(), timeout=300) as (port, p):
            yield port, p, jack


def xrun_causes(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Server-side xruns between two JackDummy.xruns() readings, by cause (jack module docstring)."""
    return {
        "xruns_clock_late": after["clock"] - before["clock"],
        "xruns_clock_max_late_us": after["clock_max_late_us"],
        "xruns_graph": after["graph"] - before["graph"],
    }


def format_causes(r: dict[str, Any]) -> str:
    return (
        f"JACK: dummy timer late {r['xruns_clock_late']}x, up to {r['xruns_clock_max_late_us']} µs; "
        f"a client late {r['xruns_graph']}x"
    )


def percentiles(x: list[float]) -> dict[str, float]:
    a = np.asarray(x, dtype=np.float64)
    return {
        "n": len(a),
        "p50": float(np.percentile(a, 50)),
        "p95": float(np.percentile(a, 95)),
        "p99": float(np.percentile(a, 99)),
        "min": float(a.min()),
        "max": float(a.max()),
    }


def _one(c: OscClient, address: str, *args: Any, timeout: float = 60.0) -> float:
    c.send(address, *args)
    _, (job,) = c.expect("/soundctm/ack", timeout)
    addr, reply = c.expect(("/soundctm/done", "/soundctm/fail"), timeout, match=lambda a: job in a)
    if addr != "/soundctm/done":
        raise RuntimeError(f"{address} failed: {reply}")
    return float(reply[1])


def run_latency(
    bundle: Path | None, samplerate: int, blocksize: int, triggers: int, lead: float, warmup: int = 5, seed: int = 0
) -> dict[str, Any]:
    from .machine import fingerprint

    rng = random.Random(seed)
    period_ms = 1e3 * blocksize / samplerate
    with jack_daemon(bundle, samplerate, blocksize, lead) as (port, _, jack), OscClient(port) as c:
        s0, x0 = c.status(), jack.xruns()
        gen: list[float] = []
        for i in range(warmup + triggers):
            ms = _one(c, "/soundctm/generate", "gritty 808 snare", 1000 + i, 1)
            if i >= warmup:
                gen.append(ms)
            time.sleep(rng.uniform(0.0, 4 * period_ms / 1e3))
        _one(c, "/soundctm/preload", "kick drum", 4, timeout=300)
        trig: list[float] = []
        for i in range(warmup + triggers):
            ms = _one(c, "/soundctm/trigger", "kick drum")
            if i >= warmup:
                trig.append(ms)
            time.sleep(rng.uniform(0.01, 0.01 + 4 * period_ms / 1e3))
        s1, x1 = c.status(), jack.xruns()
    return {
        "bench": "latency",
        "samplerate": samplerate,
        "blocksize": blocksize,
        "period_ms": period_ms,
        "lead_blocks": lead,
        "bundle": str(bundle) if bundle else "default",
        "clock": f"jackd -S -d dummy -r {samplerate} -p {blocksize}",
        "generate_1step_ms": percentiles(gen),
        "preloaded_trigger_ms": percentiles(trig),
        "underruns": s1["underruns"] - s0["underruns"],
        **xrun_causes(x0, x1),
        "starved_callbacks": s1["starved_callbacks"] - s0["starved_callbacks"],
        "voice_gaps": s1["voice_gaps"] - s0["voice_gaps"],
        "machine": fingerprint(),
    }


def format_latency(r: dict[str, Any]) -> str:
    lines = [
        f"trigger -> first sample at the DAC ({r['clock']}, period {r['period_ms']:.2f} ms, "
        f"lead {r['lead_blocks']} blocks)",
        f"{'':22}{'n':>5}{'p50':>9}{'p95':>9}{'p99':>9}{'max':>9}  ms",
    ]
    for key, name in (("preloaded_trigger_ms", "preloaded trigger"), ("generate_1step_ms", "1-step generate")):
        p = r[key]
        lines.append(f"{name:22}{p['n']:>5}{p['p50']:>9.2f}{p['p95']:>9.2f}{p['p99']:>9.2f}{p['max']:>9.2f}")
    lines.append(
        f"underruns {r['underruns']} ({format_causes(r)}), starved callbacks {r['starved_callbacks']}, "
        f"voice gaps {r['voice_gaps']}"
    )
    return "\n".join(lines)


def latency(
    bundle: Path | None = typer.Option(None, help="Bundle (default: the shipped model)."),
    blocksize: int = typer.Option(256, min=16, max=8192, help="JACK period and daemon block, frames."),
    samplerate: int = typer.Option(48000, min=8000, max=384000, help="Hz."),
    triggers: int = typer.Option(200, min=1, help="Measured jobs of each kind (after 5 warm-up ones)."),
    lead: float = typer.Option(1.0, min=0.25, max=64.0, help="The daemon's --lead (blocks)."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the report as JSON."),
) -> None:
    """Trigger -> first sample p50/p95/p99 for 1-step generates and preloaded triggers, on a JACK dummy clock."""
    r = run_latency(bundle, samplerate, blocksize, triggers, lead)
    typer.echo(format_latency(r))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(r, indent=2) + "\n")
