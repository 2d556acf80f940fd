"""`soundctm-rt bench latency`: trigger -> first sample at the DAC, and scheduled starts against their requested
time, under JACK's dummy clock.

Starts `jackd -S -d dummy` and a `soundctm-rt serve` process on it, then sends, one at a time with a random
gap (so arrivals fall at every phase of the audio period): N 1-step generates (a new seed each, so nothing is
cached) and N triggers of a preloaded prompt, untimed (as soon as possible). The daemon measures each job
itself (OSC receipt -> the DAC time of the voice's first sample) and reports it in /done.

With `--schedule MS`: N triggers in bundles time-tagged now + MS, every 10th sent right after a 1-step
generate (so one runs while the trigger waits), then N untimed triggers with the daemon's constant latency set
to MS (`/soundctm/set latency MS`). For each, the error between the requested time and the DAC time of the
voice's first sample, as the daemon measured it (`/status schedule_error_last_ms` read after each tagged job's
/done; /done's latency_ms - MS for an untimed one), in ms and samples. The daemon's clock-mapping error bound
(`clock_error_ms`) is reported beside it: the schedule error is measured on the stream clock, the mapping from
the client's NTP time adds at most that.
Warm-up jobs are sent first and not counted.
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

from .jack import JackDummy, jack_available
from .process import serve_process


@contextlib.contextmanager
def jack_daemon(
    bundle: Path | None, samplerate: int, blocksize: int, extra: list[str] | None = None
) -> Iterator[tuple[int, subprocess.Popen[str], JackDummy]]:
    """jackd dummy + a daemon process on it; yields (daemon port, process, server). Stops both by PID, daemon
    first."""
    why = jack_available()
    if why:
        typer.secho(f"error: bench needs JACK: {why}", err=True, fg="red")
        raise typer.Exit(1)  # a failure to run, not a wrong command line
    with JackDummy(samplerate, blocksize) as jack:
        args = [
            "--samplerate",
            str(samplerate),
            "--blocksize",
            str(blocksize),
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
    """n, p50/p95/p99, min and max of the finite values; `flagged`: how many were nan (not published)."""
    a = np.asarray(x, dtype=np.float64)
    flagged = int(np.count_nonzero(~np.isfinite(a)))
    a = a[np.isfinite(a)]
    if not len(a):
        return {"n": 0, "flagged": flagged}
    return {
        "n": len(a),
        "flagged": flagged,
        "p50": float(np.percentile(a, 50)),
        "p95": float(np.percentile(a, 95)),
        "p99": float(np.percentile(a, 99)),
        "min": float(a.min()),
        "max": float(a.max()),
    }


def _one(c: OscClient, address: str, *args: Any, timeout: float = 60.0, at: float | None = None) -> float:
    """Send one request (in a bundle tagged at Unix time `at`, if given); its /done latency_ms."""
    if at is None:
        c.send(address, *args)
    else:
        c.send_at(at, address, *args)
    _, (job,) = c.expect("/soundctm/ack", timeout)
    addr, reply = c.expect(("/soundctm/done", "/soundctm/fail"), timeout, match=lambda a: job in a)
    if addr != "/soundctm/done":
        raise RuntimeError(f"{address} failed: {reply}")
    return float(reply[1])


def _scheduled(
    c: OscClient, n: int, warmup: int, rng: random.Random, period_ms: float, schedule_ms: float, tagged: bool
) -> tuple[list[float], int]:
    """n preloaded triggers, each tagged now + schedule_ms (or untimed, with the daemon's latency at schedule_ms);
    every 10th right after a 1-step generate. Returns (each |schedule error| in ms, voices that started late).

    A tagged trigger's error is the daemon's `schedule_error_last_ms` (the generates are untimed: they add none);
    an untimed one's requested time is its receipt + schedule_ms, so its error is /done's latency_ms - schedule_ms.
    """
    errors: list[float] = []
    late0 = 0
    for i in range(warmup + n):
        if i == warmup:
            late0 = c.status()["late"]  # the warm-up jobs' late starts are not counted
        if i % 10 == 9 and tagged:  # (in --latency mode a generate would start late itself: it is left out)
            c.send("/soundctm/generate", "gritty 808 snare", 5000 + i, 1)  # runs while the trigger waits
            c.expect("/soundctm/ack")  # its /done is skipped by the next expect()s
        ms = _one(c, "/soundctm/trigger", "kick drum", at=time.time() + schedule_ms / 1e3 if tagged else None)
        err = float(c.status()["schedule_error_last_ms"]) if tagged else ms - schedule_ms
        if i >= warmup:
            errors.append(abs(err))
        time.sleep(rng.uniform(0.0, 4 * period_ms / 1e3))
    return errors, c.status()["late"] - late0


def run_latency(
    bundle: Path | None,
    samplerate: int,
    blocksize: int,
    triggers: int,
    schedule_ms: float | None = None,
    warmup: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    from .machine import fingerprint

    rng = random.Random(seed)
    period_ms = 1e3 * blocksize / samplerate
    sample_ms = 1e3 / samplerate
    sched: dict[str, Any] = {}
    with jack_daemon(bundle, samplerate, blocksize) as (port, _, jack), OscClient(port) as c:
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
        if schedule_ms is not None:
            tagged, late_tagged = _scheduled(c, triggers, warmup, rng, period_ms, schedule_ms, tagged=True)
            c.send("/soundctm/set", "latency", float(schedule_ms))
            c.expect("/soundctm/ack")
            constant, late_constant = _scheduled(c, triggers, warmup, rng, period_ms, schedule_ms, tagged=False)
            c.send("/soundctm/set", "latency", 0.0)
            c.expect("/soundctm/ack")
            sched = {
                "schedule_ms": schedule_ms,
                "schedule_error_ms": percentiles(tagged),
                "schedule_error_samples": percentiles([e / sample_ms for e in tagged]),
                "schedule_late": late_tagged,
                "constant_latency_error_ms": percentiles(constant),
                "constant_latency_error_samples": percentiles([e / sample_ms for e in constant]),
                "constant_latency_late": late_constant,
            }
        s1, x1 = c.status(), jack.xruns()
    return {
        "bench": "latency",
        "samplerate": samplerate,
        "blocksize": blocksize,
        "period_ms": period_ms,
        "bundle": str(bundle) if bundle else "default",
        "clock": f"jackd -S -d dummy -r {samplerate} -p {blocksize}",
        "generate_1step_ms": percentiles(gen),
        "asap_latency_ms": percentiles(trig),
        **sched,
        "clock_error_ms": s1["clock_error_ms"],
        "clock_jumps": s1["clock_jumps"] - s0["clock_jumps"],
        "dac_jitter_max_ms": s1["dac_jitter_max_ms"],
        "underruns": s1["underruns"] - s0["underruns"],
        **xrun_causes(x0, x1),
        "starved_callbacks": s1["starved_callbacks"] - s0["starved_callbacks"],
        "voice_gaps": s1["voice_gaps"] - s0["voice_gaps"],
        "machine": fingerprint(),
    }


def _row(name: str, p: dict[str, Any], fmt: str = "9.2f") -> str:
    if not p.get("n"):
        return f"{name:26}{0:>5}" + f"{'-':>9}" * 4
    cells = "".join(f"{p[k]:{fmt}}" for k in ("p50", "p95", "p99", "max"))
    flagged = f"  ({p['flagged']} flagged)" if p.get("flagged") else ""
    return f"{name:26}{p['n']:>5}{cells}{flagged}"


def format_latency(r: dict[str, Any]) -> str:
    lines = [
        f"trigger -> first sample at the DAC ({r['clock']}, period {r['period_ms']:.2f} ms)",
        f"{'':26}{'n':>5}{'p50':>9}{'p95':>9}{'p99':>9}{'max':>9}",
        _row("asap trigger (ms)", r["asap_latency_ms"]),
        _row("asap 1-step generate (ms)", r["generate_1step_ms"]),
    ]
    if "schedule_error_ms" in r:
        lines += [
            f"|DAC time of first sample - requested time|, requested = now + {r['schedule_ms']:g} ms:",
            _row("time-tagged (samples)", r["schedule_error_samples"], "9.3f"),
            _row("time-tagged (ms)", r["schedule_error_ms"], "9.4f"),
            _row("--latency mode (samples)", r["constant_latency_error_samples"], "9.3f"),
            _row("--latency mode (ms)", r["constant_latency_error_ms"], "9.4f"),
            f"late starts: time-tagged {r['schedule_late']}, --latency mode {r['constant_latency_late']}; "
            f"clock mapping error bound {r['clock_error_ms']:.4f} ms",
        ]
    lines.append(
        f"underruns {r['underruns']} ({format_causes(r)}), starved callbacks {r['starved_callbacks']}, "
        f"voice gaps {r['voice_gaps']}, clock jumps {r['clock_jumps']}, "
        f"DAC stamps up to {r['dac_jitter_max_ms']:.3f} ms after the frame grid"
    )
    return "\n".join(lines)


def latency(
    bundle: Path | None = typer.Option(None, help="Bundle (default: the shipped model)."),
    blocksize: int = typer.Option(256, min=16, max=8192, help="JACK period and daemon block, frames."),
    samplerate: int = typer.Option(48000, min=8000, max=384000, help="Hz."),
    triggers: int = typer.Option(200, min=1, help="Measured jobs of each kind (after 5 warm-up ones)."),
    schedule: float | None = typer.Option(
        None,
        min=0.0,
        max=5000.0,
        help="Also schedule triggers MS ahead (time-tagged bundles, then the daemon's --latency mode) and report "
        "the error of each start against its requested time.",
    ),
    json_path: Path | None = typer.Option(None, "--json", help="Write the report as JSON."),
) -> None:
    """Trigger -> first sample p50/p95/p99 for 1-step generates and preloaded triggers, on a JACK dummy clock;
    with --schedule, the sample accuracy of time-tagged and constant-latency starts."""
    r = run_latency(bundle, samplerate, blocksize, triggers, schedule)
    typer.echo(format_latency(r))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(r, indent=2) + "\n")
