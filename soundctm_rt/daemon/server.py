"""The daemon: one OSC thread (in order), a bounded job queue, the worker, the mixer and an audio output.

```
OSC thread --Job--> bounded queue --> worker (Engine) --chunks--> Voice --> slot table --> callback --> DAC
     \\--cache hit: Voice straight to a slot (a preloaded /trigger does not wait behind a generate)
```

Timing (scsynth's model): a generate or trigger in a bundle time-tagged in the future starts at the sample whose
DAC time is the tag; an untimed one starts at receipt + the constant latency (`--latency`, `/set latency`), or
as soon as possible when that is 0. The tag is converted to the stream clock once, on receipt (clock.py), and
the compiled callback places the voice in its block (rtmix.py). A start already past plays at once and gets
`/soundctm/late id seconds`; a tag more than `--horizon` seconds ahead is refused.

The OSC thread reads raw datagrams from its own UDP socket (no python-osc server): it receives up to 64 KiB so
an oversized datagram gets a `/fail` instead of vanishing; one blocking thread keeps messages in order; the
socket's receive buffer is raised so bursts are not dropped by the kernel. Handlers parse, validate and
enqueue; they never run inference; every problem ends in `/soundctm/fail <command> <reason>` and the loop goes on.
"""

from __future__ import annotations

import collections
import errno
import gc
import ipaddress
import logging
import math
import queue
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from . import addresses as A
from .clock import WallClock, ntp_to_unix
from .gcwatch import GCWatch, freeze_startup_heap
from .osc import IMMEDIATELY, MAX_DATAGRAM, OscError, decode_packet, encode_message, is_immediate, peek_address
from .render import RenderError, check_name
from .worker import BUSY_VOICES, LOST, PLAYING, Job, TakeCache, Worker

if TYPE_CHECKING:
    from ..engine import Engine
    from .audio import AudioOutput

log = logging.getLogger(__name__)

RECV_BYTES = 65536
# A datagram's replies are capped (bytes) so the daemon cannot be used as an amplifier: a bundle of 292 /status
# messages (8 KiB) once drew 110 KiB of replies.
REPLY_BUDGET_MIN = 4096
REPLY_BUDGET_FACTOR = 4
MAX_LOGGED_SOURCES = 1024  # refused sources logged once each, up to this many (then only counted)
WATCH_PERIOD = 0.1  # seconds between device-watchdog looks
CLOCK_SYNC_PERIOD = 0.5  # seconds between clock-mapping measurements (sooner after a clock jump)
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
    voices: int = 64  # voice slots: sounding or waiting for their start time at once
    latency_ms: float = 0.0  # untimed generate/trigger/stop take effect at receipt + this (0: as soon as possible)
    horizon_s: float = 10.0  # a bundle time-tagged further ahead is refused
    device: str | int | None = None
    output: Path | None = None
    no_audio: bool = False
    render_dir: Path | None = None
    cache_mb: int = 512  # the take cache's bound (preload/trigger takes at the device rate)


class BindError(OSError):
    """The OSC port could not be bound; the message says what to do."""


def bind_socket(host: str, port: int) -> socket.socket:
    """The daemon's UDP socket, bound to host:port (IPv4 or IPv6, whichever `host` resolves to first).

    Bound before the model loads (seconds): a busy port is reported at once, with the fix.
    """
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise BindError(f"cannot resolve --host {host!r}: {e}") from None
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SO_RCVBUF_BYTES)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise BindError(
                f"UDP port {port} on {host} is already in use (another soundctm-rt serve?): "
                "stop that one or choose another port with --port"
            ) from None
        raise BindError(f"cannot bind {host} port {port}: {e.strerror or e}") from None
    return sock


LOOPBACK = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The client's IP address; an IPv4 client seen through an IPv6 socket (::ffff:a.b.c.d) as IPv4."""
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped if mapped is not None else ip


def parse_allow(allow: Sequence[str]) -> list[Network]:
    """The --allow entries as networks (an address is a network of one). Raises ValueError on a bad entry."""
    return [ipaddress.ip_network(a, strict=False) for a in allow]


def allowed_networks(bound: str, allow: Sequence[str]) -> list[Network] | None:
    """None: any client (bound to loopback, no --allow); else the networks allowed (loopback always is).

    Raises ValueError on a bad --allow entry."""
    nets = parse_allow(allow)
    if not nets and client_address(bound).is_loopback:
        return None
    return [*nets, *LOOPBACK]


def is_allowed(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, allowed: Sequence[Network]) -> bool:
    """Whether a client address is in one of the allowed networks."""
    return any(ip.version == n.version and ip in n for n in allowed)


class Daemon:
    """The running service. `start()` binds and starts the threads; `stop()` ends them (within ~1 s).

    Args:
        engine: the engine, built with audio_active=True when audio plays.
        config: the options.
        output: the audio output (the device, or a clocked sink writing a file or discarding), None for replies
            only; normally built by `open_output`.
    """

    def __init__(
        self,
        engine: Engine,
        config: DaemonConfig,
        output: AudioOutput | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        from .mixer import Mixer
        from .rtmix import SlotTable

        self.engine = engine
        self.cfg = config
        self.output = output
        self.defaults: dict[str, Any] = {}
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=config.max_queue)
        self.cache = TakeCache(config.cache_mb << 20)
        self.table: SlotTable | None = None
        self.mixer: Mixer | None = None
        self.wall = WallClock()  # time.time() (what time tags are in) against perf_counter
        if output is not None:
            self.table = output.table
            self.mixer = Mixer(self.table, config.samplerate, output.to_perf)
        self.worker = Worker(engine, self.jobs, self.mixer, config.samplerate, self.cache, self.reply)
        if self.mixer is not None:
            self.mixer.on_started = self.worker.on_started
            self.mixer.on_unplayed = self.worker.on_unplayed
        if config.render_dir is not None:
            config.render_dir.mkdir(parents=True, exist_ok=True)  # renders open it by descriptor (render.py)
        self.sock = sock if sock is not None else bind_socket(config.host, config.port)
        self.sock.settimeout(0.1)
        self.address = self.sock.getsockname()
        self.allowed = allowed_networks(self.address[0], config.allow)
        self.disallowed_sources: set[str] = set()  # sources already logged once (bounded)
        loopback = "::1" if self.sock.family == socket.AF_INET6 else "127.0.0.1"
        self.reply_to = (config.reply_host or loopback, config.reply_port) if config.reply_port else None
        self.next_id = 1
        self._handlers: dict[str, A.Handler] = {c.name: getattr(self, c.handler) for c in A.COMMANDS.values()}
        self.counters: collections.Counter[str] = collections.Counter()
        self.started_at = time.monotonic()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.gc = GCWatch()
        self._tl = threading.local()  # per thread: reply bytes spent on the datagram being handled
        self.device_lost: str | None = None  # why the audio output died (watchdog), None while it plays

    # --- replies ---
    def reply(self, client: tuple[str, int] | None, address: str, *args: Any) -> None:
        """Send to the client and to the reply port, if set (scsynth style)."""
        data = encode_message(address, *args)
        targets = {t for t in (client, self.reply_to) if t is not None and t[1]}
        if getattr(self._tl, "reply_bytes", None) is not None:  # the OSC thread, answering one datagram
            self._tl.reply_bytes += len(data) * len(targets)
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
        budget = max(REPLY_BUDGET_MIN, REPLY_BUDGET_FACTOR * len(data))
        self._tl.reply_bytes = 0
        try:
            for i, m in enumerate(messages):
                if self._tl.reply_bytes >= budget:
                    left = len(messages) - i
                    self._fail(
                        client,
                        "packet",
                        f"{left} of {len(messages)} messages not run: replies to one datagram are capped at "
                        f"{budget} bytes ({REPLY_BUDGET_FACTOR}x its size); send fewer per bundle",
                    )
                    return
                try:
                    self.handle_message(m.address, m.args, client, t_receipt, m.timetag)
                except A.Refusal as e:
                    self._fail(client, m.address.rsplit("/", 1)[-1][:40], str(e))
                except Exception as e:  # a bug must not take the OSC thread down
                    log.exception("handler failed on %s", m.address)
                    self._fail(client, m.address.rsplit("/", 1)[-1][:40], f"internal error: {type(e).__name__}")
        finally:
            self._tl.reply_bytes = None

    def _checked_params(self, values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
        """The engine's generation parameters for these request values over these defaults; raises Refusal."""
        try:
            return self.engine.check_params(**A.engine_params(values, defaults))
        except ValueError as e:
            raise A.Refusal(str(e)) from None

    def _render_target(self, filename: str) -> tuple[Path, PurePosixPath]:
        """(render folder, relative name), checked before any work (render.check_name); raises Refusal."""
        root = self.cfg.render_dir
        if root is None:
            raise A.Refusal("render is off: start the daemon with --render-dir DIR")
        root = root.resolve()  # the operator's folder (a link there is theirs); nothing below it is followed
        try:
            return root, check_name(filename, root)
        except RenderError as e:
            raise A.Refusal(str(e)) from None

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

    def latency_ms(self) -> float:
        """The constant latency now in force (ms; 0: as soon as possible)."""
        return float(self.defaults.get("latency", self.cfg.latency_ms))

    def _check_horizon(self, timetag: int) -> None:
        if is_immediate(timetag):
            return
        ahead = ntp_to_unix(timetag) - time.time()
        if ahead > self.cfg.horizon_s:
            raise A.Refusal(f"too far ahead: time tag {ahead:.3f} s from now, horizon {self.cfg.horizon_s:g} s")

    def _when(self, timetag: int, t_receipt: float) -> float:
        """When a message's effect is due, on the stream clock (s): its bundle's time tag, or receipt + the
        constant latency; NaN for as soon as possible (and always without an audio output)."""
        if self.output is None:
            return math.nan
        if is_immediate(timetag):
            lat = self.latency_ms()
            return math.nan if lat <= 0 else float(self.output.from_perf(t_receipt)) + lat / 1e3
        return float(self.output.from_perf(self.wall.to_perf(ntp_to_unix(timetag))))

    def handle_message(
        self,
        address: str,
        args: tuple[Any, ...],
        client: tuple[str, int],
        t_receipt: float,
        timetag: int = IMMEDIATELY,
    ) -> None:
        """Run one message through its command's handler (the address table names it). Generate, trigger and
        stop take effect at the message's time (`_when`); the others at once. Raises A.Refusal."""
        req = A.parse(address, args)  # raises Refusal
        self._check_horizon(timetag)
        self.counters[req.command] += 1
        self._handlers[req.command](req, client, t_receipt, timetag)

    def handle_ping(self, req: A.Request, client: tuple[str, int], t_receipt: float, timetag: int) -> None:
        self.reply(client, "/soundctm/pong")

    def handle_status(self, req: A.Request, client: tuple[str, int], t_receipt: float, timetag: int) -> None:
        self.reply(client, "/soundctm/status.reply", *self.status_args())

    def handle_set(self, req: A.Request, client: tuple[str, int], t_receipt: float, timetag: int) -> None:
        key, value = req.values["key"], req.values["value"]
        if key in A.ENGINE_PARAMS:
            self._checked_params({}, {**self.defaults, key: value})
        self.defaults[key] = value
        self.reply(client, "/soundctm/ack", self._new_id())

    def handle_stop(self, req: A.Request, client: tuple[str, int], t_receipt: float, timetag: int) -> None:
        vid = int(req.values.get("id", 0))
        if vid and not self._is_live(vid):
            raise A.Refusal(f"no such voice: {vid} is not queued, generating or playing")
        t_stop = self._when(timetag, t_receipt)
        if self.mixer is not None:
            self.mixer.stop_voice(vid, t_stop)
        for job in self._live_jobs():
            if vid == 0 or job.id == vid:
                if math.isnan(t_stop):
                    job.cancelled = True  # the worker ends it with /fail ... stopped
                else:
                    job.t_stop = t_stop  # its voice, once there, ends at t_stop (never plays if it starts later)
        if vid == 0 and math.isnan(t_stop):
            self._drain_queue()
        self.reply(client, "/soundctm/ack", vid)  # the voice's id (0: all), not a fresh one

    def handle_job(self, req: A.Request, client: tuple[str, int], t_receipt: float, timetag: int) -> None:
        """generate, trigger, preload and render: a Job for the worker (a cached trigger plays at once)."""
        v = req.values
        c = req.command
        if c in PLAYING and self.device_lost is not None:
            raise A.Refusal(f"{LOST}: {self.device_lost}; restart the daemon")
        gain = v.get("gain", self.defaults.get("gain", 1.0))
        pan = v.get("pan", self.defaults.get("pan", 0.0))
        job = Job(self._new_id(), c, t_receipt, client, v["prompt"], gain=gain, pan=pan)
        if c in PLAYING:
            job.t_start = self._when(timetag, t_receipt)
        if c == "render":
            job.render_root, job.render_name = self._render_target(v["filename"])
            job.path = job.render_root / job.render_name
        if c == "trigger":
            take = self.cache.next(v["prompt"])
            if take is not None:
                self.reply(client, "/soundctm/ack", job.id)
                if not self.worker.play_take(job, take):
                    self.worker.fail(job, BUSY_VOICES)
                return
        job.params = self._checked_params(v, self.defaults)
        job.takes = int(v.get("takes", 1))
        self._enqueue(job)

    def _live_jobs(self) -> list[Job]:
        """The jobs waiting in the queue and the one generating (a snapshot)."""
        with self.jobs.mutex:
            queued = list(self.jobs.queue)
        cur = self.worker.current
        return queued + ([cur] if cur is not None else [])

    def _is_live(self, vid: int) -> bool:
        """Whether /stop id has something to stop: a queued or generating job, or a voice still sounding."""
        if any(job.id == vid for job in self._live_jobs()):
            return True
        return self.mixer is not None and self.mixer.has_voice(vid)

    def _drain_queue(self, reason: str = "stopped", only: tuple[str, ...] | None = None) -> None:
        """Fail every queued job (or those whose command is in `only`; the others go back in order)."""
        keep = []
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if only is None or job.command in only:
                self.worker.fail(job, reason)
            else:
                keep.append(job)
        for job in keep:
            self.jobs.put_nowait(job)  # fewer than were taken out: cannot be full

    def on_device_lost(self, reason: str) -> None:
        """The audio output died: every job it would have played gets /fail "audio device lost", at once.

        Renders and preloads do not need the device and go on; new generates and triggers are refused.
        """
        log.error("audio device lost: %s", reason)
        self.device_lost = reason
        self.worker.device_lost = reason
        if self.mixer is not None:
            self.mixer.stop()
            for v in self.mixer.drop_all():
                job = getattr(v, "job", None)
                if job is not None:
                    self.worker.fail(job, LOST)
        cur = self.worker.current
        if cur is not None and cur.command in PLAYING:
            cur.cancel_reason = LOST
            cur.cancelled = True
        self._drain_queue(LOST, only=PLAYING)

    def status(self) -> dict[str, Any]:
        """State and counters (also the /status reply, flattened to key value pairs)."""
        lat = sorted(self.worker.latencies)

        def pct(q: float, xs: list[float] = lat) -> float:
            return float(xs[min(len(xs) - 1, math.ceil(q * len(xs)) - 1)]) if xs else -1.0

        prompts, takes, cache_bytes = self.cache.stats()
        mode = "no-audio" if self.output is None else ("file" if self.cfg.output is not None else "audio")
        s: dict[str, Any] = {
            "mode": "device-lost" if self.device_lost is not None else mode,
            "samplerate": self.cfg.samplerate,
            "blocksize": self.cfg.blocksize,
            "queue": self.jobs.qsize(),
            "busy": int(self.worker.current is not None),
            "voices": self.mixer.active() if self.mixer else 0,
            "completed": self.worker.completed,
            "failed": self.worker.failed,
            "refused": self.counters["refused"],
            "disallowed": self.counters["disallowed"],
            "datagrams": self.counters["datagrams"],
            "cached_prompts": prompts,
            "cached_takes": takes,
            "cache_mb": round(cache_bytes / (1 << 20), 3),
            "cache_mb_limit": self.cfg.cache_mb,
            "latency_last_ms": float(self.worker.latencies[-1]) if self.worker.latencies else -1.0,
            "latency_p50_ms": pct(0.5),
            "latency_p99_ms": pct(0.99),
            "uptime_s": round(time.monotonic() - self.started_at, 3),
            "latency_ms": self.latency_ms(),
            "horizon_s": self.cfg.horizon_s,
        }
        if self.table is not None:
            s.update(self.table.counters())
            s["dac_jitter_max_ms"] = round(1e3 * self.table.dac_jitter_max(), 4)
        if self.mixer is not None:
            errors = list(self.mixer.schedule_errors)
            mag = sorted(1e3 * abs(e) for e in errors)
            s["scheduled"] = self.mixer.scheduled()
            s["late"] = self.mixer.late
            s["schedule_error_last_ms"] = 1e3 * errors[-1] if errors else -1.0
            s["schedule_error_p50_ms"] = pct(0.5, mag)
            s["schedule_error_p99_ms"] = pct(0.99, mag)
            s["schedule_error_max_ms"] = mag[-1] if mag else -1.0
            s["latencies_flagged"] = self.mixer.latencies_flagged
            s["latency_flag_reason"] = self.mixer.latency_flag_reason
        if self.output is not None:
            s["clock_sync_error_ms"] = round(1e3 * float(self.output.sync_error), 4)
            s["clock_error_ms"] = round(1e3 * self.clock_error(), 4)
        if self.device_lost is not None:
            s["device_error"] = self.device_lost
        s.update(self.gc.counters())
        return s

    def clock_error(self) -> float:
        """Error bound (s) of the time-tag -> DAC mapping: half of each link's bracket, plus how far each offset
        moved at its last re-measurement (the drift one sync period can leave)."""
        out = self.output
        return float(out.sync_error + out.sync_step) + self.wall.error if out is not None else self.wall.error

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
            if self.allowed is not None and not self._is_allowed(client[0]):
                continue  # never answer strangers
            try:
                self.handle_datagram(data, client, t)
            except Exception:
                log.exception("datagram from %s", client)

    def _is_allowed(self, host: str) -> bool:
        """Whether --allow admits this source; a refused one is counted, and logged the first time it is seen."""
        assert self.allowed is not None
        if is_allowed(client_address(host), self.allowed):
            return True
        self.counters["disallowed"] += 1
        if host not in self.disallowed_sources and len(self.disallowed_sources) < MAX_LOGGED_SOURCES:
            self.disallowed_sources.add(host)
            log.warning("dropping datagrams from %s: not in --allow (counted as 'disallowed' in /status)", host)
        return False

    def _clock_loop(self) -> None:
        """Re-measure both clock links every CLOCK_SYNC_PERIOD, and at once after the callback saw a clock jump."""
        assert self.table is not None and self.output is not None
        out = self.output
        last, jumps = time.monotonic(), self.table.counters()["clock_jumps"]
        while not self._stop.wait(0.05) and self.device_lost is None:
            j = self.table.counters()["clock_jumps"]
            if j == jumps and time.monotonic() - last < CLOCK_SYNC_PERIOD:
                continue
            last, jumps = time.monotonic(), j
            try:
                out.sync_clock()
                self.wall.sync()
            except Exception:  # the stream may be closing
                return

    def _watch_loop(self) -> None:
        """The device watchdog: a dead stream is noticed within ~WATCH_PERIOD (or its stall time)."""
        assert self.output is not None
        out = self.output
        while not self._stop.wait(WATCH_PERIOD):
            try:
                reason = out.lost()
            except Exception as e:  # asking a dying stream can fail too: that is the answer
                reason = f"the audio stream failed: {e}"
            if reason is not None:
                self.on_device_lost(reason)
                return

    # --- lifecycle ---
    def start(self) -> None:
        """Start the audio path, the worker and the OSC thread."""
        if self.output is not None:
            assert self.table is not None
            self.table.warmup()  # compiled before the stream starts
        # after every start-up allocation: later collections scan only new objects (gcwatch module docstring)
        log.info("froze %d start-up objects out of the collector's way", freeze_startup_heap())
        self.gc.install()
        self.worker.start()
        if self.output is not None:
            assert self.mixer is not None
            self.mixer.start()
            self.output.start()
            for target, name in ((self._clock_loop, "soundctm-clock-sync"), (self._watch_loop, "soundctm-watchdog")):
                t = threading.Thread(target=target, name=name, daemon=True)
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
        # One deadline for every join: a stuck thread (they are all daemon threads) costs its share, not more.
        deadline = time.monotonic() + 0.6
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        self.worker.stop(timeout=max(0.05, deadline - time.monotonic()))
        if self.mixer is not None:
            self.mixer.stop()
        if self.output is not None:
            try:
                self.output.close()
            except Exception:
                log.exception("closing the audio output")
        self.sock.close()

    @property
    def abandoned_output(self) -> bool:
        """True when the audio stream could not be closed: leave the process with os._exit (audio.close)."""
        return bool(getattr(self.output, "abandoned", False))


def open_output(config: DaemonConfig) -> AudioOutput | None:
    """The audio output the config asks for: None (--no-audio), a ClockedSink (--output) or the device.

    Raises audio.NoAudioDevice with advice when there is no device.
    """
    from .audio import ClockedSink, DeviceOutput
    from .mixer import FADE_SECONDS
    from .rtmix import SlotTable

    if config.no_audio:
        return None
    table = SlotTable(config.voices, config.channels, config.samplerate, round(FADE_SECONDS * config.samplerate))
    if config.output is not None:
        return ClockedSink(table, config.samplerate, config.blocksize, config.output)
    return DeviceOutput(table, config.samplerate, config.blocksize, config.channels, config.device)
