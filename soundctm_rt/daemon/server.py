"""The daemon: one OSC thread (in order), a bounded job queue, the worker, the mixer and an audio output.

```
OSC thread --Job--> bounded queue --> worker (Engine) --chunks--> Voice --> mixer --> Ring --> callback --> DAC
     \\--cache hit: Voice straight to the mixer (a preloaded /trigger does not wait behind a generate)
```

The OSC thread reads raw datagrams from its own UDP socket (no python-osc server): it receives up to 64 KiB so
an oversized datagram gets a `/fail` instead of vanishing; one blocking thread keeps messages in order; the
socket's receive buffer is raised so bursts are not dropped by the kernel. Handlers parse, validate and
enqueue; they never run inference; every problem ends in `/soundctm/fail <command> <reason>` and the loop goes on.
"""

from __future__ import annotations

import collections
import gc
import ipaddress
import logging
import math
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import addresses as A
from .gcwatch import GCWatch, freeze_startup_heap
from .osc import MAX_DATAGRAM, OscError, decode_packet, encode_message, peek_address
from .worker import Job, TakeCache, Worker

log = logging.getLogger(__name__)

RECV_BYTES = 65536
SO_RCVBUF_BYTES = 4 << 20


@dataclass
class DaemonConfig:
    """Options of `soundctm-rt serve` (see daemon/cli.py for their meaning)."""

    host: str = "127.0.0.1"
    port: int = 9000
    reply_host: str | None = None
    reply_port: int | None = None
    allow: list[str] = field(default_factory=list)
    max_queue: int = 8
    samplerate: int = 48000
    blocksize: int = 256
    channels: int = 2
    lead_blocks: float = 1.0
    device: str | int | None = None
    output: Path | None = None
    no_audio: bool = False
    render_dir: Path | None = None


def _allowed_networks(host: str, allow: list[str]) -> list[Any] | None:
    """None: any client (loopback bind); else the networks allowed (loopback always is)."""
    nets = [ipaddress.ip_network(a, strict=False) for a in allow]
    if not nets and ipaddress.ip_address(socket.gethostbyname(host)).is_loopback:
        return None
    return [*nets, ipaddress.ip_network("127.0.0.0/8")]


class Daemon:
    """The running service. `start()` binds and starts the threads; `stop()` ends them (within ~1 s).

    Args:
        engine: a soundctm_rt.engine.Engine, built with audio_active=True when audio plays.
        config: the options.
        output: an audio output (audio.DeviceOutput / audio.ClockedSink) or None for replies only;
            normally built by `open_output`.
    """

    def __init__(self, engine: Any, config: DaemonConfig, output: Any = None) -> None:
        from .mixer import Mixer
        from .ring import Ring

        self.engine = engine
        self.cfg = config
        self.output = output
        self.allowed = _allowed_networks(config.host, config.allow)
        self.defaults: dict[str, Any] = {}
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=config.max_queue)
        self.cache = TakeCache()
        self.ring: Ring | None = None
        self.mixer: Mixer | None = None
        if output is not None:
            self.ring = output.ring
            lead = round(config.lead_blocks * config.blocksize)
            self.mixer = Mixer(self.ring, config.samplerate, config.blocksize, lead, output.to_perf)
        self.worker = Worker(engine, self.jobs, self.mixer, config.samplerate, self.cache, self.reply)
        if self.mixer is not None:
            self.mixer.on_started = self.worker.on_started
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SO_RCVBUF_BYTES)
        self.sock.bind((config.host, config.port))
        self.sock.settimeout(0.1)
        self.address = self.sock.getsockname()
        self.reply_to = (config.reply_host or "127.0.0.1", config.reply_port) if config.reply_port else None
        self.next_id = 1
        self.counters: collections.Counter[str] = collections.Counter()
        self.started_at = time.monotonic()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.gc = GCWatch()

    # --- replies ---
    def reply(self, client: tuple[str, int] | None, address: str, *args: Any) -> None:
        """Send to the client and to the reply port, if set (scsynth style)."""
        data = encode_message(address, *args)
        targets = {t for t in (client, self.reply_to) if t is not None and t[1]}
        for t in targets:
            try:
                self.sock.sendto(data, t)
            except OSError as e:  # e.g. the client's port is gone; never fatal
                log.debug("reply to %s failed: %s", t, e)

    def _fail(self, client: tuple[str, int], command: str, reason: str) -> None:
        self.counters["refused"] += 1
        self.reply(client, "/soundctm/fail", command, reason)

    # --- the OSC thread ---
    def handle_datagram(self, data: bytes, client: tuple[str, int], t_receipt: float) -> None:
        """Parse, validate, enqueue or answer. Never raises."""
        self.counters["datagrams"] += 1
        if len(data) > MAX_DATAGRAM:
            name = (peek_address(data) or "packet").rsplit("/", 1)[-1][:40]
            self._fail(client, name, f"datagram too large ({len(data)} > {MAX_DATAGRAM} bytes)")
            return
        try:
            messages = decode_packet(data)
        except OscError as e:
            name = (peek_address(data) or "packet").rsplit("/", 1)[-1][:40]
            self._fail(client, name, f"malformed OSC: {e}")
            return
        for m in messages:
            try:
                self.handle_message(m.address, m.args, client, t_receipt)
            except A.Refusal as e:
                self._fail(client, m.address.rsplit("/", 1)[-1][:40], str(e))
            except Exception as e:  # a bug must not take the OSC thread down
                log.exception("handler failed on %s", m.address)
                self._fail(client, m.address.rsplit("/", 1)[-1][:40], f"internal error: {type(e).__name__}")

    def _engine_params(self, v: dict[str, Any]) -> dict[str, Any]:
        d = self.defaults
        p = {
            "seed": v.get("seed", d.get("seed", 0)),
            "steps": v.get("steps", d.get("steps")),
            "gamma": v.get("gamma", d.get("gamma")),
            "omega": v.get("cfg", d.get("cfg")),
            "nu": d.get("nu"),
            "duration": v.get("duration", d.get("duration")),
        }
        try:
            return self.engine.check_params(**p)
        except ValueError as e:
            raise A.Refusal(str(e)) from None

    def _render_path(self, filename: str) -> Path:
        root = self.cfg.render_dir
        if root is None:
            raise A.Refusal("render is off: start the daemon with --render-dir DIR")
        if "\x00" in filename or filename.startswith(("/", "\\")) or ".." in Path(filename).parts:
            raise A.Refusal("file name must be relative, inside the render folder")
        if not filename.lower().endswith(".wav"):
            raise A.Refusal("file name must end in .wav")
        root = root.resolve()
        path = (root / filename).resolve()
        if not path.is_relative_to(root) or path == root:
            raise A.Refusal("file name must stay inside the render folder")
        return path

    def _new_id(self) -> int:
        i = self.next_id
        self.next_id += 1
        return i

    def _enqueue(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            self._fail(job.client, job.command, "busy")
            return
        self.reply(job.client, "/soundctm/ack", job.id)

    def handle_message(self, address: str, args: tuple[Any, ...], client: tuple[str, int], t_receipt: float) -> None:
        req = A.parse(address, args)  # raises Refusal
        v = req.values
        c = req.command
        self.counters[c] += 1
        if c == "ping":
            self.reply(client, "/soundctm/pong")
        elif c == "status":
            self.reply(client, "/soundctm/status.reply", *self.status_args())
        elif c == "set":
            if v["key"] in ("steps", "gamma", "cfg", "duration", "seed", "nu"):
                trial = {**self.defaults, v["key"]: v["value"]}
                self._check_defaults(trial)
            self.defaults[v["key"]] = v["value"]
            self.reply(client, "/soundctm/ack", self._new_id())
        elif c == "stop":
            vid = int(v.get("id", 0))
            if self.mixer is not None:
                self.mixer.stop_voice(vid)
            cur = self.worker.current
            if cur is not None and (vid == 0 or cur.id == vid):
                cur.cancelled = True
            if vid == 0:
                self._drain_queue()
            self.reply(client, "/soundctm/ack", self._new_id())
        elif c in ("generate", "trigger", "preload", "render"):
            gain = v.get("gain", self.defaults.get("gain", 1.0))
            pan = v.get("pan", self.defaults.get("pan", 0.0))
            job = Job(self._new_id(), c, t_receipt, client, v["prompt"], gain=gain, pan=pan)
            if c == "render":
                job.path = self._render_path(v["filename"])
            if c == "trigger":
                take = self.cache.next(v["prompt"])
                if take is not None:
                    self.reply(client, "/soundctm/ack", job.id)
                    self.worker.play_take(job, take)
                    return
            job.params = self._engine_params(v)
            job.takes = int(v.get("takes", 1))
            self._enqueue(job)

    def _check_defaults(self, d: dict[str, Any]) -> None:
        p = {
            "steps": d.get("steps"),
            "gamma": d.get("gamma"),
            "omega": d.get("cfg"),
            "nu": d.get("nu"),
            "duration": d.get("duration"),
            "seed": d.get("seed", 0),
        }
        try:
            self.engine.check_params(**p)
        except ValueError as e:
            raise A.Refusal(str(e)) from None

    def _drain_queue(self) -> None:
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            self.worker.fail(job, "stopped")

    def status(self) -> dict[str, Any]:
        """State and counters (also the /status reply, flattened to key value pairs)."""
        lat = sorted(self.worker.latencies)

        def pct(q: float) -> float:
            return float(lat[min(len(lat) - 1, math.ceil(q * len(lat)) - 1)]) if lat else -1.0

        prompts, takes, _cache_bytes = self.cache.stats()
        s: dict[str, Any] = {
            "mode": "audio"
            if self.output is not None and self.cfg.output is None
            else ("file" if self.output is not None else "no-audio"),
            "samplerate": self.cfg.samplerate,
            "blocksize": self.cfg.blocksize,
            "queue": self.jobs.qsize(),
            "busy": int(self.worker.current is not None),
            "voices": self.mixer.active() if self.mixer else 0,
            "completed": self.worker.completed,
            "failed": self.worker.failed,
            "refused": self.counters["refused"],
            "datagrams": self.counters["datagrams"],
            "cached_prompts": prompts,
            "cached_takes": takes,
            "latency_last_ms": float(self.worker.latencies[-1]) if self.worker.latencies else -1.0,
            "latency_p50_ms": pct(0.5),
            "latency_p99_ms": pct(0.99),
            "uptime_s": round(time.monotonic() - self.started_at, 3),
        }
        if self.ring is not None:
            s.update(self.ring.counters())
        if self.mixer is not None:
            s["voice_gaps"] = self.mixer.voice_gaps
        s.update(self.gc.counters())
        return s

    def status_args(self) -> list[Any]:
        out: list[Any] = []
        for k, val in self.status().items():
            out += [k, val]
        return out

    def _osc_loop(self) -> None:
        while not self._stop.is_set():
            try:
                data, client = self.sock.recvfrom(RECV_BYTES)
            except TimeoutError:
                continue
            except OSError as e:
                if self._stop.is_set():
                    return
                log.warning("recvfrom failed: %s", e)
                continue
            t = time.perf_counter()
            if self.allowed is not None and not any(ipaddress.ip_address(client[0]) in n for n in self.allowed):
                self.counters["disallowed"] += 1
                continue  # never answer strangers
            try:
                self.handle_datagram(data, client, t)
            except Exception:
                log.exception("datagram from %s", client)

    def _clock_loop(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.output.sync_clock()
            except Exception:  # the stream may be closing
                return

    # --- lifecycle ---
    def start(self) -> None:
        """Start the audio path, the worker and the OSC thread."""
        from .mixer import resample

        resample(np.zeros(64, dtype=np.float32), self.engine.sample_rate, self.cfg.samplerate)  # compile (numba)
        if self.output is not None:
            assert self.mixer is not None and self.ring is not None
            self.ring.warmup()
            self.mixer.mix(self.cfg.blocksize)  # first-call costs out of the way
        # after every start-up allocation: later collections scan only new objects (gcwatch module docstring)
        log.info("froze %d start-up objects out of the collector's way", freeze_startup_heap())
        self.gc.install()
        self.worker.start()
        if self.output is not None:
            assert self.mixer is not None
            self.mixer.step()  # publish the first lead of silence before the stream starts
            self.mixer.start()
            self.output.start()
            t = threading.Thread(target=self._clock_loop, name="soundctm-clock-sync", daemon=True)
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._osc_loop, name="soundctm-osc", daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        """Stop everything: OSC thread, worker (cancelling its job), mixer, audio output. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        self.gc.uninstall()
        gc.unfreeze()  # hand the start-up objects back to the collector (matters when embedded, e.g. in tests)
        for t in self._threads:
            t.join(timeout=0.5)
        self.worker.stop(timeout=0.5)
        if self.mixer is not None:
            self.mixer.stop()
        if self.output is not None:
            try:
                self.output.close()
            except Exception:
                log.exception("closing the audio output")
        self.sock.close()


def open_output(config: DaemonConfig) -> Any:
    """The audio output the config asks for: None (--no-audio), a ClockedSink (--output) or the device.

    Raises audio.NoAudioDevice with advice when there is no device.
    """
    from .audio import ClockedSink, DeviceOutput
    from .ring import Ring

    if config.no_audio:
        return None
    lead = round(config.lead_blocks * config.blocksize)
    ring = Ring(max(4 * config.blocksize, 2 * lead + config.blocksize), config.channels)
    if config.output is not None:
        return ClockedSink(ring, config.samplerate, config.blocksize, config.output)
    return DeviceOutput(ring, config.samplerate, config.blocksize, config.channels, config.device)
