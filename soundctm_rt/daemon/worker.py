"""The worker thread: the only user of the Engine. Takes jobs from the bounded queue, generates (streaming into
a voice when audio plays), fills the take cache, renders files, and reports through the `Replies` callbacks.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np

from ..sampling import Stopped as SamplingStopped
from .mixer import Mixer, StreamResampler, Voice, resample
from .render import RenderError, write_wav

if TYPE_CHECKING:
    from ..engine import Engine

log = logging.getLogger(__name__)

Reply = Callable[..., None]  # reply(client, address, *args)
LOST = "audio device lost"  # the /fail reason of every job the dead device would have played
MAX_WARN_CHARS = 1000  # a /warn reason names a long prompt and three captions; a datagram stays well under 8 KiB


@dataclass
class Job:
    """A request accepted by the OSC thread (already validated)."""

    id: int
    command: str  # generate | preload | trigger | render
    t_receipt: float  # time.perf_counter() at receipt
    client: tuple[str, int]
    prompt: str
    params: dict[str, Any] = field(default_factory=dict)  # engine params: seed steps gamma omega nu duration
    gain: float = 1.0
    pan: float = 0.0
    takes: int = 1
    t_start: float = math.nan  # requested start of its voice, stream clock (s); NaN: as soon as possible
    t_stop: float = math.nan  # a timed /stop that came before the voice existed, stream clock (s)
    path: Path | None = None  # render target as reported in /done: render_root / render_name
    render_root: Path | None = None
    render_name: PurePosixPath | None = None  # checked on arrival (render.check_name), confined again at write
    cancelled: bool = False
    cancel_reason: str = "stopped"  # the /fail reason when cancelled: "stopped", "audio device lost"
    # completion: /done needs both the first-sample latency (mixer) and the timing (worker)
    latency_ms: float | None = None
    timing: dict[str, Any] | None = None
    finished: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class TakeCache:
    """Cached takes per prompt at the device rate (mono float32), bounded in bytes, least recently used out."""

    def __init__(self, max_bytes: int = 512 << 20) -> None:
        self.max_bytes = max_bytes
        self._takes: collections.OrderedDict[str, list[np.ndarray]] = collections.OrderedDict()
        self._next: dict[str, int] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def add(self, prompt: str, take: np.ndarray) -> None:
        with self._lock:
            self._takes.setdefault(prompt, []).append(take)
            self._takes.move_to_end(prompt)
            self._bytes += take.nbytes
            while self._bytes > self.max_bytes and len(self._takes) > 1:
                old, takes = self._takes.popitem(last=False)
                self._next.pop(old, None)
                self._bytes -= sum(t.nbytes for t in takes)

    def next(self, prompt: str) -> np.ndarray | None:
        """The next take of a prompt, round robin; None if none is cached."""
        with self._lock:
            takes = self._takes.get(prompt)
            if not takes:
                return None
            i = self._next.get(prompt, 0) % len(takes)
            self._next[prompt] = i + 1
            self._takes.move_to_end(prompt)
            return takes[i]

    def stats(self) -> tuple[int, int, int]:
        """(prompts, takes, bytes)."""
        with self._lock:
            return len(self._takes), sum(len(t) for t in self._takes.values()), self._bytes


PLAYING = ("generate", "trigger")  # the jobs that need the audio device


class Worker:
    """Runs jobs on the engine, one at a time, in order.

    Args:
        engine: the engine (used from this thread only).
        jobs: the bounded queue the OSC thread fills.
        mixer: where voices go; None in no-audio mode (replies only).
        device_rate: the output's sample rate (Hz).
        cache: the take cache.
        reply: reply(client, address, *args) sends an OSC reply.
    """

    def __init__(
        self,
        engine: Engine,
        jobs: queue.Queue[Job],
        mixer: Mixer | None,
        device_rate: int,
        cache: TakeCache,
        reply: Reply,
    ) -> None:
        self.engine = engine
        self.jobs = jobs
        self.mixer = mixer
        self.device_rate = device_rate
        self.cache = cache
        self.reply = reply
        self.current: Job | None = None
        self.completed = 0
        self.failed = 0
        self.latencies: collections.deque[float] = collections.deque(maxlen=1000)
        self.device_lost: str | None = None  # set by the daemon's watchdog: no job may play any more
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- replies ---
    def fail(self, job: Job, reason: str) -> None:
        """Send /fail for the job, once: a job that already got /done or /fail is left alone."""
        with job.lock:
            if job.finished:
                return
            job.finished = True
        self.failed += 1
        self.reply(job.client, "/soundctm/fail", job.command, reason, job.id)

    def warn_if_far(self, job: Job) -> None:
        """Send /warn when the job's prompt is far from every caption the model was trained on. Advice only: a
        failed check is logged, never the job's failure."""
        try:
            reason = self.engine.prompt_warning(job.prompt)
        except Exception:
            log.warning("known-prompt check of job %d failed", job.id, exc_info=True)
            return
        if reason:
            self.reply(job.client, "/soundctm/warn", job.id, reason[:MAX_WARN_CHARS])

    def _finish(self, job: Job) -> None:
        """Send /done once both halves are known (called from the worker and from the mixer thread)."""
        with job.lock:
            if job.finished or job.timing is None or job.latency_ms is None:
                return
            job.finished = True
        t = job.timing
        args: list[Any] = [
            job.id,
            float(job.latency_ms),
            float(t.get("rtf", 0.0)),
            float(t.get("audio_seconds", 0.0)),
            float(t.get("total_ms", 0.0)),
        ]
        if job.path is not None:
            args.append(str(job.path))
        if job.latency_ms > 0:
            self.latencies.append(job.latency_ms)
        self.completed += 1
        self.reply(job.client, "/soundctm/done", *args)

    def on_started(self, voice: Voice, latency_ms: float) -> None:
        """Mixer callback: the voice's first sample reached the DAC at receipt + latency_ms; a voice that started
        after its requested time gets `/soundctm/late id seconds` first."""
        job = getattr(voice, "job", None)
        if job is None:
            return
        if voice.late_s > 0:
            self.reply(job.client, "/soundctm/late", job.id, float(voice.late_s))
        job.latency_ms = latency_ms
        self._finish(job)

    def on_unplayed(self, voice: Voice) -> None:
        """Mixer callback: the voice ended before its first sample (a /stop came before its start time)."""
        job = getattr(voice, "job", None)
        if job is not None:
            self.fail(job, job.cancel_reason)

    def _voice(self, job: Job, **kwargs: Any) -> Voice:
        v = Voice(job.id, job.t_receipt, job.gain, job.pan, t_start=job.t_start, t_stop=job.t_stop, **kwargs)
        v.job = job  # type: ignore[attr-defined]
        return v

    def play_take(self, job: Job, take: np.ndarray) -> bool:
        """Start a cached take (called from the OSC thread for cache hits: it does not wait behind the queue).
        False when every voice slot is taken (the caller refuses the request)."""
        if self.mixer is None:
            job.latency_ms = (time.perf_counter() - job.t_receipt) * 1e3
        elif not self.mixer.add(self._voice(job, take=take)):
            return False
        job.timing = {"rtf": 0.0, "audio_seconds": len(take) / self.device_rate, "total_ms": 0.0}
        self._finish(job)
        return True

    # --- jobs ---
    def _stream_into_voice(self, job: Job) -> np.ndarray:
        """Generate with the streaming decoder; play as chunks arrive (when audio runs). Returns the full take."""
        eng = self.engine
        rs = StreamResampler(eng.sample_rate, self.device_rate)
        voice: Voice | None = None
        parts: list[np.ndarray] = []

        def should_stop() -> bool:
            stopped = voice is not None and (voice.stopped or voice.ended)
            return job.cancelled or stopped or self.device_lost is not None

        try:
            for chunk in eng.stream(job.prompt, should_stop=should_stop, **job.params):
                y = rs.push(chunk)
                parts.append(y)
                if self.mixer is None:
                    if job.latency_ms is None:
                        job.latency_ms = (time.perf_counter() - job.t_receipt) * 1e3
                    continue
                if voice is None:
                    duration = float(job.params.get("duration") or eng.max_duration)
                    n_in = round(duration * eng.sample_rate)
                    voice = self._voice(job, capacity=math.ceil(n_in * self.device_rate / eng.sample_rate) + 64)
                    voice.push(y)
                    if not self.mixer.add(voice):
                        raise _Busy
                else:
                    voice.push(y)
            tail = rs.flush()
            parts.append(tail)
            if voice is not None:
                voice.push(tail)
        finally:
            if voice is not None:
                voice.close()  # also on failure: the mixer frees a slot only once its producer is done with it
        if self.device_lost is not None and self.mixer is not None:
            job.cancel_reason = LOST
            raise _Stopped
        if job.cancelled or (voice is not None and (voice.stopped or voice.cut)) or eng.last_timing is None:
            raise _Stopped
        return np.concatenate(parts)

    def _run_job(self, job: Job) -> None:
        eng = self.engine
        self.warn_if_far(job)  # every job here generates: the warning comes before its audio and /done
        if job.command in ("generate", "trigger"):
            take = self._stream_into_voice(job)
            if job.command == "trigger":
                self.cache.add(job.prompt, take)
            assert eng.last_timing is not None  # without it _stream_into_voice raised _Stopped
            job.timing = eng.last_timing.to_dict()
            if job.latency_ms is None and self.mixer is not None and not take.size:
                job.latency_ms = 0.0
            self._finish(job)
        elif job.command == "preload":
            # seeds 0..takes-1 sampled as batches through the graphs (Engine.generate_variations); each take is
            # cached as soon as it is decoded, so a /trigger can play the first before the last is done
            t0 = time.perf_counter()
            seconds = 0.0
            params = {**job.params, "seed": 0}
            for variation in eng.generate_variations(
                job.prompt, job.takes, should_stop=lambda: job.cancelled, **params
            ):
                self.cache.add(job.prompt, resample(variation.audio, eng.sample_rate, self.device_rate))
                seconds += variation.timing.audio_seconds
            if job.cancelled:
                raise _Stopped
            total = 1e3 * (time.perf_counter() - t0)
            job.latency_ms = 0.0
            job.timing = {"rtf": total / 1e3 / max(seconds, 1e-9), "audio_seconds": seconds, "total_ms": total}
            self._finish(job)
        elif job.command == "render":
            audio, timing = eng.generate(job.prompt, **job.params)
            assert job.render_root is not None and job.render_name is not None
            write_wav(job.render_root, job.render_name, audio, eng.sample_rate)
            job.latency_ms = 0.0
            job.timing = timing.to_dict()
            self._finish(job)
        else:  # the OSC thread only enqueues the commands above
            raise ValueError(f"unknown job {job.command}")

    def run(self) -> None:
        lower_thread_priority(WORKER_NICE)
        while not self._stop.is_set():
            try:
                job = self.jobs.get(timeout=0.1)
            except queue.Empty:
                continue
            self.current = job
            try:
                if job.cancelled:
                    raise _Stopped
                if self.device_lost is not None and self.mixer is not None and job.command in PLAYING:
                    job.cancel_reason = LOST
                    raise _Stopped
                self._run_job(job)
            except (_Stopped, SamplingStopped):  # ours, or the engine's between sampling steps
                self.fail(job, job.cancel_reason)
            except _Busy:
                self.fail(job, BUSY_VOICES)
            except RenderError as e:
                self.fail(job, str(e))
            except Exception as e:  # the engine refused or broke: tell the client, keep serving
                log.exception("job %d (%s) failed", job.id, job.command)
                self.fail(job, f"{type(e).__name__}: {e}"[:200])
            finally:
                self.current = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="soundctm-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        if self.current is not None:
            self.current.cancelled = True
        if self._thread is not None:
            self._thread.join(timeout=timeout)


# The worker's inference (onnxruntime runs a 1-thread session in the calling thread) yields the CPU to the mixer
# thread, which has one block of slack, and to the OSC thread: raising a thread's nice value needs no privilege.
WORKER_NICE = 10


def lower_thread_priority(nice: int) -> bool:
    """Raise the calling thread's nice value by `nice` (Linux: per thread); False where the OS has no such call."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
        return True
    except (AttributeError, OSError):  # not Linux/BSD, or refused
        return False


class _Stopped(Exception):
    """The job was cancelled by /stop."""


class _Busy(Exception):
    """Every voice slot is taken: the job's voice cannot play."""


BUSY_VOICES = "busy: every voice is playing or scheduled (--voices)"
