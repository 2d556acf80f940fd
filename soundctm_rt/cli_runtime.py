"""`soundctm-rt generate` and `soundctm-rt info`: torch-free commands over a bundle.

Exit codes (README "Exit codes"): 0 done; 1 a failure while doing it (bundle, files, generation); 2 a wrong
command line, found before any work (typer's own usage errors, and a value or combination the command refuses).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import typer

from .bundle import Bundle, BundleError, resolve_bundle

BACKEND_HELP = "Inference backend: onnxruntime or openvino."
EXIT_FAILURE = 1
EXIT_USAGE = 2  # click's code for its own usage errors: one code for every wrong command line


def fail(msg: str, code: int = EXIT_FAILURE) -> typer.Exit:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def usage_error(msg: str) -> typer.Exit:
    return fail(msg, EXIT_USAGE)


# shared by `generate` and `serve`
DECODER_ITERATIONS = typer.Option(
    None,
    "--decoder-iterations",
    min=0,
    max=64,
    help="Griffin-Lim iterations of a mel model's decoder (default: the bundle's; more: a more consistent "
    "phase at ~4 ms each per clip).",
)


def generate(
    prompt: str = typer.Argument(..., help="What to hear, e.g. 'Roland TR-808 kick drum'."),
    output: Path = typer.Option(
        Path("out.wav"),
        "--output",
        "-o",
        help="WAV file to write; with --variations K, "
        "K files NAME_000.wav ... or, if the path is a folder, files inside it.",
    ),
    steps: int | None = typer.Option(None, help="Student steps (default: the bundle's; 2 for the shipped model)."),
    gamma: float | None = typer.Option(None, help="γ in [0, 1]: 0 = deterministic CTM, 1 = consistency-model."),
    cfg: float | None = typer.Option(None, "--cfg", "--omega", help="Guidance scale ω the student was trained on."),
    nu: float | None = typer.Option(None, help="ν-guidance of the student (1 = none, skips the unconditional pass)."),
    seed: int = typer.Option(0, help="Seed of all noise: the same seed gives the same sound."),
    duration: float | None = typer.Option(None, help="Seconds (at most the model's clip length)."),
    variations: int = typer.Option(
        1, min=1, max=1024, help="K takes with seeds seed, seed+1, ..., sampled in batches through the graphs."
    ),
    int8: bool = typer.Option(False, "--int8", help="Run the bundle's INT8 graphs (edge variant; see `info`)."),
    bundle: Path | None = typer.Option(None, help="Bundle directory or zip (default: the shipped model)."),
    backend: str = typer.Option("onnxruntime", help=BACKEND_HELP),
    device: str = typer.Option("cpu", help="cpu, gpu or npu (where the backend has it)."),
    threads: int | None = typer.Option(None, min=1, help="Intra-op threads (default: all cores)."),
    fmt: str = typer.Option("PCM_16", "--subtype", help="WAV subtype: PCM_16, PCM_24 or FLOAT."),
    json_out: bool = typer.Option(False, "--json", help="Print the timing records as JSON lines."),
    peak_db: float | None = typer.Option(
        None,
        "--peak-db",
        help="Scale each take so that its decoded peak sits exactly at this level in dBFS (e.g. -1). Without it a "
        "mel model's take is set from its code before decoding to a predicted -1 dBFS peak (about ±3 dB), and "
        "a soft limiter keeps it within full scale.",
    ),
    raw_level: bool = typer.Option(
        False,
        "--raw-level",
        help="Keep the level the model made (no level setting from the code; the soft limiter still applies).",
    ),
    decoder_iterations: int | None = DECODER_ITERATIONS,
) -> None:
    """Generate sound from a text prompt and write WAV files."""
    import soundfile as sf

    from .backends import BackendOptions
    from .engine import Engine

    if fmt not in ("PCM_16", "PCM_24", "FLOAT"):
        raise usage_error(f"--subtype must be PCM_16, PCM_24 or FLOAT, not {fmt!r}")
    if output.suffix.lower() != ".wav" and not (variations > 1 and (output.is_dir() or output.suffix == "")):
        raise usage_error(f"--output must end in .wav (or be a folder with --variations), got {output}")
    if peak_db is not None and not (math.isfinite(peak_db) and -60.0 <= peak_db <= 0.0):
        raise usage_error(f"--peak-db must be in [-60, 0] dBFS, got {peak_db}")
    try:
        prompt = Engine.check_prompt(prompt)  # the daemon refuses the same prompts with the same words
        BackendOptions(backend=backend, device=device, threads=threads)
    except ValueError as e:
        raise usage_error(str(e)) from None
    paths = output_paths(output, variations)
    for why in map(unwritable, paths):  # before any work: a take must not be lost at the last step
        if why:
            raise fail(why)
    t0 = time.perf_counter()
    try:
        eng = Engine(
            resolve_bundle(bundle),
            backend=backend,
            device=device,
            threads=threads,
            warmup=False,
            int8=int8,
            normalise_level=not raw_level,
            decoder_iterations=decoder_iterations,
        )
    except (BundleError, OSError, ValueError) as e:
        raise fail(str(e)) from None
    try:
        eng.check_params(steps=steps, gamma=gamma, omega=cfg, nu=nu, duration=duration, seed=seed)
        if seed + variations - 1 > 2**63 - 1:
            raise ValueError("seed + variations exceeds the seed range")
    except ValueError as e:
        raise usage_error(str(e)) from None
    try:  # the graphs open here, so that no take's timing (RTF) includes loading the model
        eng.load(steps=steps, nu=nu, takes=variations)
    except (BundleError, OSError) as e:
        raise fail(str(e)) from None
    typer.echo(
        f"loaded {bundle or 'the shipped model'} on {backend} ({device}) in {1e3 * (time.perf_counter() - t0):.0f} ms",
        err=True,
    )
    _warn_about_prompt(eng, prompt)
    try:
        paths[0].parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise fail(f"cannot make the folder {paths[0].parent}: {e.strerror}") from None
    for path, (take_seed, audio, timing) in zip(
        paths, _takes(eng, prompt, variations, seed, steps, gamma, cfg, nu, duration), strict=True
    ):
        gain_db = 0.0
        if peak_db is not None:
            audio, gain_db = _to_peak(audio, peak_db)
            if gain_db >= MAX_PEAK_GAIN_DB:
                typer.echo(
                    f"warning: {path} is near silence; --peak-db gain capped at +{MAX_PEAK_GAIN_DB:g} dB", err=True
                )
        try:
            sf.write(str(path), audio, eng.sample_rate, subtype=fmt)
        except (OSError, RuntimeError) as e:  # soundfile reports its own failures as RuntimeError
            raise fail(f"cannot write {path}: {e}") from None
        if json_out:
            rec = {"file": str(path), "seed": take_seed, **timing.to_dict()}
            if peak_db is not None:
                rec["gain_db"] = round(gain_db, 2)
            typer.echo(json.dumps(rec))
        else:
            typer.echo(
                f"{path}  {timing.audio_seconds:.2f} s  {timing.total_ms:.1f} ms  RTF {timing.rtf:.4f} ({timing.path})"
            )


def _takes(
    eng: Any,
    prompt: str,
    k: int,
    seed: int,
    steps: int | None,
    gamma: float | None,
    omega: float | None,
    nu: float | None,
    duration: float | None,
) -> Iterator[tuple[int, Any, Any]]:
    """(seed, audio, timing) of each take as soon as it is decoded: one take alone, K takes as batches (the
    graphs run once per batch, so 16 variations cost far less than 16 single takes)."""
    try:
        if k == 1:
            audio, timing = eng.generate(
                prompt, seed=seed, steps=steps, gamma=gamma, omega=omega, nu=nu, duration=duration
            )
            yield seed, audio, timing
            return
        for take in eng.generate_variations(
            prompt, k, seed=seed, steps=steps, gamma=gamma, omega=omega, nu=nu, duration=duration
        ):
            yield take.seed, take.audio, take.timing
    except BundleError as e:
        raise fail(str(e)) from None


def _warn_about_prompt(eng: Any, prompt: str) -> None:
    """Print one warning line when the text encoder cuts the prompt or it is far from the bundle's known prompts;
    advice, never an error."""
    try:
        note = eng.prompt_warning(prompt)
    except (BundleError, ValueError, OSError) as e:
        logging.getLogger(__name__).debug("known-prompt check skipped: %s", e)
        note = eng.truncation_warning(prompt)
    if note:
        typer.echo(f"warning: {note}", err=True)


def unwritable(path: Path) -> str | None:
    """Why a WAV cannot be written at path, or None; found without leaving anything behind."""
    if path.is_dir():
        return f"cannot write {path}: it is a folder"
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # the folders that generate would make
        folder = folder.parent
    if not folder.is_dir():
        return f"cannot write {path}: {folder} is a file, not a folder"
    try:
        if path.exists():
            with open(path, "r+b"):  # opened for writing, not truncated
                pass
        else:
            tempfile.TemporaryFile(dir=folder).close()  # access() is not enough: root, read-only mounts, /proc
    except OSError as e:
        where = path if path.exists() else folder
        return f"cannot write {path}: {where} is not writable ({e.strerror or e})"
    return None


MAX_PEAK_GAIN_DB = 60.0  # --peak-db lifts a quiet take, it does not turn numerical silence into noise


def _to_peak(audio: np.ndarray, peak_db: float) -> tuple[np.ndarray, float]:
    """audio scaled so that max |audio| = peak_db dBFS (at most +60 dB of gain); and the gain in dB."""
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak <= 0.0:
        return audio, 0.0
    gain_db = min(peak_db - 20.0 * math.log10(peak), MAX_PEAK_GAIN_DB)
    return (audio * 10.0 ** (gain_db / 20.0)).astype(audio.dtype), gain_db


def output_paths(output: Path, k: int) -> list[Path]:
    if k == 1:
        return [output]
    if output.is_dir() or output.suffix == "":
        return [output / f"take_{i:03d}.wav" for i in range(k)]
    return [output.with_name(f"{output.stem}_{i:03d}.wav") for i in range(k)]


def info(
    bundle: Path | None = typer.Argument(None, help="Bundle directory or zip (default: the shipped model)."),
    as_json: bool = typer.Option(False, "--json", help="Print the raw manifest."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the sha256 check of every file."),
) -> None:
    """Print a bundle's manifest in human form."""
    try:
        b = Bundle.open(resolve_bundle(bundle), verify=not no_verify)
    except BundleError as e:
        raise fail(str(e)) from None
    if as_json:
        typer.echo(json.dumps(b.manifest, indent=2))
        return
    sys.stdout.write(describe(b))


def describe(b: Bundle) -> str:
    m = b.manifest
    lat, g, edm, text = m["latent"], m["guidance"], m["edm"], m["text"]
    cfg = m["model"].get("config", {})
    prov = m["model"].get("provenance", {})
    total = sum(f["bytes"] for f in m["files"].values())
    lines = [
        f"bundle      {b.root}",
        f"model       {m['model'].get('name')}  (schema v{m['schema_version']}, {total / 1e6:.1f} MB in "
        f"{len(m['files'])} files)",
        f"provenance  {_kv(prov)}",
        f"audio       {m['audio']['sample_rate']} Hz, {m['audio']['channels']} channel(s); clip "
        f"{lat['frames'] * lat['hop'] / m['audio']['sample_rate']:.2f} s",
        f"latent      {lat['channels']} ch x {lat['frames']} frames at {lat['frame_rate']:.2f} Hz "
        f"(hop {lat['hop']}); " + _decoder_line(lat),
        f"edm         sigma {edm['sigma_min']} .. {edm['sigma_max']}, rho {edm['rho']}, sigma_data {edm['sigma_data']}",
        f"guidance    omega trained on [{g['omega_min']}, {g['omega_max']}]; defaults omega {g['default_omega']}, "
        f"nu {g['default_nu']}, gamma {g['default_gamma']}, steps {g['default_steps']}",
        f"text        {text['encoder']} (hidden {text['hidden']}, max {text['max_length']} tokens, "
        f"{text['tokenizer']})",
    ]
    if "dit" in cfg:
        d = cfg["dit"]
        lines.append(f"student     DiT width {d['width']}, depth {d['depth']}, heads {d['heads']}")
    lines.append(f"fused       steps {m.get('fused_steps')}")
    comp = m.get("compression") or {}
    if comp.get("weights", "fp32") != "fp32" or comp.get("int8_embeddings"):
        q = comp.get("text_encoder_vs_fp32") or {}
        int8 = "yes" if comp.get("int8_embeddings") else "no"
        lines.append(
            f"storage     weights {comp['weights']}, INT8 word embeddings {int8}"
            f", OpenVINO reads {comp.get('openvino_format') or '-'}; text encoder vs float32 on {q.get('captions')} "
            f"captions: pooled cosine min {q.get('pooled_cosine_min')}"
        )
    lines.append("graphs")
    par = m.get("parity", {}).get("graphs", {})
    for name, spec in m["graphs"].items():
        ins = ", ".join(f"{i['name']}{list(i['shape'])}" for i in spec["inputs"])
        outs = ", ".join(f"{o['name']}{list(o['shape'])}" for o in spec["outputs"])
        snr = "; ".join(
            f"{be} " + ", ".join(f"{o} {v['snr_db']} dB" for o, v in r.items()) for be, r in par.get(name, {}).items()
        )
        lines.append(f"  {name:<19} {ins} -> {outs}")
        lines.append(f"  {'':<19} backends: {', '.join(spec['files'])}; parity vs torch: {snr or 'n/a'}")
    for name, v in (m.get("int8") or {}).items():
        lines.append(f"  {name:<19} INT8 ({v['file']}): {_kv(v.get('quality', {}))}")
    lines += _known_lines(b)
    for lic in m.get("licenses", []):
        lines.append(f"licence     {lic['component']}: {lic['name']} — {lic['license']} ({lic['source']})")
    return "\n".join(lines) + "\n"


def _known_lines(b: Bundle, n_examples: int = 12) -> list[str]:
    """The bundle's known prompts for `info`: count, threshold, corpora and examples spread over the list."""
    from .known_prompts import KnownPrompts

    try:
        known = KnownPrompts.from_bundle(b)
    except BundleError as e:
        return [f"known       unreadable: {e}"]
    if known is None:
        return ["known       no known prompts (exported without --captions): prompts are not checked"]
    cal = known.calibration
    rates = ""
    if cal:
        fw, miss = cal.get("false_warning_rate"), cal.get("miss_rate")
        rates = f"; calibration: false warnings {fw}, misses {miss} ({cal.get('rule')})"
    lines = [f"known       {len(known)} prompts; warns below cosine {known.threshold:.3f}{rates}"]
    if known.corpora():
        lines.append(f"  corpora           {_kv(known.corpora())}")
    lines += [f"  {'examples' if i == 0 else '':<17} {c}" for i, c in enumerate(known.examples(n_examples))]
    return lines


def _kv(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items() if v is not None) or "-"


def _decoder_line(lat: dict[str, Any]) -> str:
    """How the bundle's latent is decoded, for `info`."""
    if lat.get("kind") == "mel":
        m = lat["mel"]
        return (
            f"log-mel {m['n_mels']} bins, decoded on the host by fast Griffin-Lim ({m['iterations']} iterations, "
            f"STFT hop {m['syn_hop']}, chunks of {m['chunk_frames']} frames + {m['lookahead_frames']} look-ahead)"
        )
    return f"VAE decoder context {lat['decoder_context']} frames, stream chunk {lat['stream_chunk']}"
