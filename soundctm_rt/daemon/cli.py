"""`soundctm-rt serve`: the OSC daemon."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

import typer

from ..cli_runtime import DECODER_ITERATIONS

log = logging.getLogger(__name__)


def _err(msg: str, code: int = 2) -> typer.Exit:
    """An error line; code 2 for a wrong command line, 1 for a failure while starting (README "Exit codes")."""
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def serve(
    bundle: Path | None = typer.Option(None, help="Bundle directory or zip (default: the shipped model)."),
    host: str = typer.Option(
        "127.0.0.1", help="Address to bind, IPv4 or IPv6 (e.g. ::1); wider than loopback needs --allow."
    ),
    port: int = typer.Option(9000, min=0, max=65535, help="UDP port for OSC (0: any free port)."),
    reply_host: str | None = typer.Option(
        None, help="Also send every reply here (default 127.0.0.1 with --reply-port)."
    ),
    reply_port: int | None = typer.Option(
        None, min=1, max=65535, help="Also send every reply to this port (Max's udpsend cannot receive replies)."
    ),
    device: str | None = typer.Option(None, help="Audio output device (PortAudio name or index; default device)."),
    output: Path | None = typer.Option(None, help="Record the output to this WAV file instead of a sound card."),
    no_audio: bool = typer.Option(False, "--no-audio", help="No audio output: generate and reply only."),
    samplerate: int = typer.Option(48000, min=8000, max=384000, help="Output sample rate (Hz)."),
    blocksize: int = typer.Option(256, min=16, max=8192, help="Frames per audio callback."),
    channels: int = typer.Option(2, min=1, max=2, help="Output channels (2: pan applies)."),
    latency: float = typer.Option(
        0.0,
        min=0.0,
        max=5000.0,
        help="Constant latency, ms: untimed generate/trigger/stop take effect at receipt + MS, sample-accurately "
        "(for clients that cannot send time-tagged bundles); 0: as soon as possible. /soundctm/set latency changes it.",
    ),
    horizon: float = typer.Option(
        10.0, min=0.01, max=3600.0, help="Refuse bundles time-tagged more than this many seconds ahead."
    ),
    voices: int = typer.Option(
        64, min=1, max=4096, help="Voices sounding or waiting for their time tag at once; more get /fail ... busy."
    ),
    max_queue: int = typer.Option(8, min=1, max=1024, help="Jobs waiting at most; more get /fail ... busy."),
    allow: list[str] = typer.Option(
        [], "--allow", help="Client address or network allowed (repeatable); required to serve beyond loopback."
    ),
    render_dir: Path | None = typer.Option(None, help="Folder /soundctm/render may write into (off without it)."),
    cache_mb: int = typer.Option(
        512, min=1, max=1 << 20, help="Take cache for /preload and /trigger, MiB (least recently used prompts go)."
    ),
    backend: str = typer.Option("onnxruntime", help="Inference backend: onnxruntime or openvino."),
    engine_device: str = typer.Option("cpu", help="Inference device: cpu, gpu or npu (where the backend has it)."),
    threads: int | None = typer.Option(None, min=1, help="Intra-op threads (default: cores - 1 with audio)."),
    raw_level: bool = typer.Option(
        False,
        "--raw-level",
        help="Play takes at the level the model made (default: each set from its code to a predicted -1 dBFS "
        "peak before decoding; the soft limiter applies either way).",
    ),
    decoder_iterations: int | None = DECODER_ITERATIONS,
) -> None:
    """Serve prompts over OSC: /soundctm/generate 'gritty 808 snare' 7 plays it (see docs/osc.md)."""
    from ..bundle import BundleError, resolve_bundle
    from .audio import NoAudioDevice
    from .server import BindError, Daemon, DaemonConfig, bind_socket, client_address, open_output, parse_allow

    if sum([device is not None, output is not None, no_audio]) > 1:
        raise _err("choose one of --device, --output and --no-audio")
    if output is not None and output.suffix.lower() != ".wav":
        raise _err(f"--output must end in .wav, got {output}")
    try:
        nets = parse_allow(allow)
    except ValueError as e:
        raise _err(f"bad --allow: {e}") from None
    for n in nets:
        if n.prefixlen == 0:
            typer.secho(
                f"warning: --allow {n} lets every address on the internet play sound and write renders here; "
                "name your clients' addresses or networks instead",
                fg=typer.colors.YELLOW,
                err=True,
            )
    try:
        # Bound first, before the audio device and the model (seconds): a busy port is reported at once.
        sock = bind_socket(host, port)
    except BindError as e:
        raise _err(str(e), 1) from None
    if not client_address(sock.getsockname()[0]).is_loopback and not nets:
        sock.close()
        raise _err(f"binding to {host} exposes the daemon: add --allow ADDR for each client (or bind 127.0.0.1)")
    dev: str | int | None = int(device) if device is not None and device.isdigit() else device
    cfg = DaemonConfig(
        host=host,
        port=port,
        reply_host=reply_host,
        reply_port=reply_port,
        allow=list(allow),
        max_queue=max_queue,
        samplerate=samplerate,
        blocksize=blocksize,
        channels=channels,
        voices=voices,
        latency_ms=latency,
        horizon_s=horizon,
        device=dev,
        output=output,
        no_audio=no_audio,
        render_dir=render_dir,
        cache_mb=cache_mb,
    )
    if render_dir is not None:
        try:
            render_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            sock.close()
            raise _err(f"cannot create --render-dir {render_dir}: {e.strerror or e}", 1) from None
    # A short GIL switch interval: the OSC thread (receipt stamps) waits at most this long for the interpreter;
    # the audio callback never needs it.
    sys.setswitchinterval(0.001)
    try:
        out = open_output(cfg)  # opens the device first: a missing one is reported before the model loads
    except NoAudioDevice as e:
        sock.close()
        raise _err(str(e), 1) from None
    from ..engine import Engine

    try:
        engine = Engine(
            resolve_bundle(bundle),
            backend=backend,
            device=engine_device,
            threads=threads,
            audio_active=out is not None,
            normalise_level=not raw_level,
            decoder_iterations=decoder_iterations,
        )
        daemon = Daemon(engine, cfg, out, sock)
    except (BundleError, OSError, ValueError) as e:
        if out is not None:
            out.close()
        sock.close()
        raise _err(str(e), 1) from None
    stop = threading.Event()

    def _on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    daemon.start()
    h, p = daemon.address[:2]
    typer.echo(f"listening on {h}:{p}", nl=True)
    sys.stdout.flush()
    try:
        while not stop.wait(0.2):
            pass
    finally:
        daemon.stop()
        log.info("stopped")
    if daemon.device_lost is not None:
        typer.secho(f"error: audio device lost: {daemon.device_lost}", fg=typer.colors.RED, err=True)
    if daemon.abandoned_output:
        # PortAudio cannot close a stream whose server died, and its atexit Pa_Terminate would hang or abort:
        # leave without running exit handlers (everything of ours is already flushed and closed).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    if daemon.device_lost is not None:
        raise typer.Exit(1)
