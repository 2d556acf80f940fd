"""`soundctm-rt train ...` (also `python -m soundctm_rt.train ...`, torchrun-capable)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from .data import ClipDataset

app = typer.Typer(help="Prepare data and train the VAE, the EDM teacher and the CTM student.", no_args_is_help=True)

# ----------------------------------------------------------------------------------------------------------
# Data preparation, VAE and EDM teacher (train/data.py, train/vae_train.py, train/teacher_train.py).

_CONFIG = typer.Option("cpu", "--config", "-c", help="config name (tiny, cpu, gpu) or path to a TOML file")
_DATA = typer.Option(..., "--data", help="prepared dataset directory (`train prepare`)")
_RUN = typer.Option(
    ...,
    "--run",
    "--run-dir",
    help="run directory (created; holds config, logs, checkpoints, samples). "
    "Under torchrun write --run-dir: torchrun takes --run for an abbreviation of its --run-path",
)
_MAX_STEPS = typer.Option(None, "--max-steps", help="stop after this step (the lr schedule keeps the config's length)")
_RESUME = typer.Option(False, "--resume", help="continue from the run directory's last checkpoint")
_DRY = typer.Option(False, "--dry-run", help="print the resolved config and exit")
_THREADS = typer.Option(None, "--threads", help="torch intra-op threads per process (default: torch's choice)")


@contextlib.contextmanager
def data_errors() -> Iterator[None]:
    """A dataset that cannot serve a command (train.data.DataError) ends it with one line and exit code 1."""
    from .data import DataError

    try:
        yield
    except DataError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None


def evaluation_dataset(data: Path, threads: int | None, command: str, test_use: str, without_valid: str) -> ClipDataset:
    """An evaluation command's start: torch's threads, then the dataset, refused (exit 1, one line) without the
    test split it draws prompts from; `without_valid` says what is lost when the valid split is empty."""
    import torch

    from .data import ClipDataset, check_splits

    if threads:
        torch.set_num_threads(threads)
    ds = ClipDataset(data)
    with data_errors():
        ds.require("test", f"`soundctm-rt {command}` ({test_use})")
        check_splits(ds, command, {"valid": without_valid})
    return ds


def _read_names(path: Path | None, option: str) -> tuple[str, ...]:
    """The file names of a list file: one per line; blank lines and lines starting with # are skipped."""
    if path is None:
        return ()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise typer.BadParameter(f"cannot read {path}: {e.strerror}", param_hint=option) from None
    names = tuple(n for n in (line.strip() for line in lines) if n and not n.startswith("#"))
    if not names:
        raise typer.BadParameter(f"{path} names no file", param_hint=option)
    return names


@app.command()
def prepare(
    audio: list[Path] = typer.Option(None, "--audio", help="folder of audio (repeatable)"),
    captions: list[Path] = typer.Option(
        None,
        "--captions",
        help="CSV with path,caption for the --audio at the same position (omit for all: folder names give captions)",
    ),
    data_root: Path = typer.Option(
        None,
        "--data-root",
        help="folder of corpora: each subfolder with a metadata.csv (path, caption, split columns) is one more "
        "--audio with its --captions, e.g. ../shared/data",
    ),
    out: Path = typer.Option(..., "-o", "--out", help="dataset directory to write"),
    config: str = _CONFIG,
    valid_fraction: float = typer.Option(
        None,
        "--valid-fraction",
        help="share of the folders held out for validation (of the files, when the folders are too few), for "
        "sources without split/machine/fold columns (default: the config's hash_valid_fraction, 0.05)",
    ),
    test_fraction: float = typer.Option(
        None, "--test-fraction", help="the same for the test split (default: the config's hash_test_fraction, 0.05)"
    ),
    valid_files: Path = typer.Option(
        None,
        "--valid-files",
        help="text file naming validation files, one per line, relative to their --audio folder: they go to "
        "valid whatever the other rules say, and no other file is hashed into valid",
    ),
    test_files: Path = typer.Option(None, "--test-files", help="the same for the test split"),
    dry_run: bool = _DRY,
) -> None:
    """Audio folders (+ captions) -> mono clips at the model rate and length, train/valid/test splits.

    The inputs are named: --audio folders (with their --captions), the corpora of --data-root, or both.
    Warns when a split comes out empty or tiny; the stages skip what an empty valid or test split would feed.
    """
    from .data import DataConfig, Source, corpus_sources, prepare_dataset
    from .loop import build_table
    from .models.config import load_model_config, load_toml

    if not audio and data_root is None:
        raise typer.BadParameter("name the audio: --audio DIR [--captions CSV] (repeatable) or --data-root DIR")
    cfg = load_model_config(config)
    dcfg = build_table(DataConfig, load_toml(config).get("data", {}), "data")
    over: dict[str, Any] = {
        "hash_valid_fraction": valid_fraction,
        "hash_test_fraction": test_fraction,
        "valid_files": _read_names(valid_files, "--valid-files") or None,
        "test_files": _read_names(test_files, "--test-files") or None,
    }
    try:
        dcfg = dataclasses.replace(dcfg, **{k: v for k, v in over.items() if v is not None})
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if captions and len(captions) != len(audio or []):
        raise typer.BadParameter("give one --captions per --audio, or none")
    sources = [Source(a, captions[i] if captions else None) for i, a in enumerate(audio or [])]
    if data_root is not None:
        with data_errors():
            sources += corpus_sources(data_root)
    clip = cfg.dit.latent_frames * cfg.latent_hop
    if dry_run:
        typer.echo(
            json.dumps(
                {
                    "sources": [str(s) for s in sources],
                    "sample_rate": cfg.sample_rate,
                    "clip_samples": clip,
                    "data": dataclasses.asdict(dcfg),
                },
                indent=2,
            )
        )
        return
    with data_errors():
        rep = prepare_dataset(sources, out, cfg.sample_rate, clip, cfg.latent_hop, dcfg)
    typer.echo(f"{out}: clips {rep.clips}, files {rep.files}, {len(rep.bad)} bad files (see bad_files.csv)")
    for w in rep.warnings:
        typer.echo(f"warning: {w}")


@app.command()
def vae(
    config: str = _CONFIG,
    data: Path = _DATA,
    run: Path = _RUN,
    max_steps: int = _MAX_STEPS,
    resume: bool = _RESUME,
    dry_run: bool = _DRY,
    threads: int = _THREADS,
    steps: int = typer.Option(None, "--steps", help="override vae_train.steps"),
    batch_size: int = typer.Option(None, "--batch-size", help="override vae_train.batch_size (global)"),
) -> None:
    """Train the 44.1 kHz VAE; at the end: latent cache, latent statistics, test-split report."""
    from .vae_train import resolve, train_vae

    if dry_run:
        typer.echo(json.dumps(resolve(config, data, steps=steps, batch_size=batch_size)[2], indent=2))
        return
    with data_errors():
        train_vae(
            config,
            data,
            run,
            max_steps=max_steps,
            resume=resume,
            threads=threads,
            steps=steps,
            batch_size=batch_size,
        )


@app.command("vae-decoder")
def vae_decoder(
    config: str = _CONFIG,
    data: Path = _DATA,
    vae: Path = typer.Option(..., "--vae", help="finished `train vae` run whose decoder is fine-tuned"),
    run: Path = _RUN,
    max_steps: int = _MAX_STEPS,
    resume: bool = _RESUME,
    dry_run: bool = _DRY,
    threads: int = _THREADS,
    steps: int = typer.Option(None, "--steps", help="override vae_decoder_train.steps"),
    batch_size: int = typer.Option(None, "--batch-size", help="override vae_decoder_train.batch_size (global)"),
    latent_noise: float = typer.Option(None, "--latent-noise", help="override vae_decoder_train.latent_noise"),
) -> None:
    """Fine-tune only the decoder of a VAE run on its cached latents: the encoder, the latents and every model
    trained on them stay valid (swap it into a model checkpoint with `train swap-vae`)."""
    from .vae_decoder_train import resolve, train_vae_decoder

    overrides: dict[str, Any] = {"steps": steps, "batch_size": batch_size, "latent_noise": latent_noise}
    if dry_run:
        typer.echo(json.dumps(resolve(config, data, vae, **overrides)[1], indent=2))
        return
    with data_errors():
        train_vae_decoder(config, data, vae, run, max_steps=max_steps, resume=resume, threads=threads, **overrides)


@app.command("swap-vae")
def swap_vae_cmd(
    checkpoint: Path = typer.Argument(..., help="model checkpoint (`train distill` or teacher final)"),
    vae: Path = typer.Option(..., "--vae", help="VAE run sharing the checkpoint's latent space (`train vae-decoder`)"),
    out: Path = typer.Option(..., "-o", "--out", help="checkpoint to write (fp16)"),
) -> None:
    """Put a fine-tuned decoder into a model checkpoint: same encoder and latent statistics, new decoder."""
    from .checkpoint import load_model_checkpoint, save_model_checkpoint, swap_vae
    from .vae_run import load_latent_stats, load_vae_run

    src = load_model_checkpoint(checkpoint)
    vae_model, _, vae_id = load_vae_run(vae)
    mu, std = load_latent_stats(vae)
    try:
        swapped = swap_vae(src, vae_model, mu, std, {"vae_run": str(vae.resolve()), "vae_id": vae_id})
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    save_model_checkpoint(out, swapped)
    typer.echo(f"{out}: student of {checkpoint} with the VAE of {vae} ({vae_id})")


@app.command("vae-finalize")
def vae_finalize(data: Path = _DATA, run: Path = _RUN, threads: int = _THREADS) -> None:
    """(Re)compute a finished VAE run's latent cache, statistics and test report."""
    import torch

    from .data import ClipDataset, check_splits
    from .vae_run import REPORT_SKIPPED, finalize_vae

    if threads:
        torch.set_num_threads(threads)
    ds = ClipDataset(data)
    with data_errors():
        check_splits(ds, "vae-finalize", {"test": REPORT_SKIPPED})
    finalize_vae(run, ds)


@app.command("vae-embedding-report")
def vae_embedding_report(
    data: Path = _DATA,
    run: Path = typer.Option(None, "--run", "--run-dir", help="a finished `train vae` run to test (optional)"),
    config: str = typer.Option(
        None, "--config", "-c", help="test the mel-code decoder of this config (latent = 'mel'; default: cpu)"
    ),
    variants: str = typer.Option(
        "",
        "--variants",
        help="also test mel decoders with other SYN_HOPxITERATIONS settings, e.g. 256x8,512x16 "
        "(the quality-versus-time curve)",
    ),
    json_path: Path = typer.Option(None, "--json", help="write the report here (default: RUN/report/...)"),
    embedding: str = typer.Option("birdnet", "--embedding", help="birdnet | logmel | auto"),
    max_train_clips: int = typer.Option(800, "--max-train-clips", help="real training clips: reference set and probe"),
    threads: int = _THREADS,
) -> None:
    """The adoption gate of a decoder: its round trip of the real test clips vs mel128 + Griffin-Lim (32
    iterations, no training) in the evaluation embedding (FD, KID and probe accuracy with 95 % bootstrap
    intervals, ms per clip), with the real test clips as the floor. Tests the config's mel-code decoder
    (and --variants of it), and a VAE run when --run is given."""
    import dataclasses as dc

    import torch

    from .birdnet import make_embedding
    from .data import ClipDataset
    from .latent import MelCodec
    from .models.config import load_model_config
    from .recon_embedding import adoption_verdict, embedding_report
    from .report import MelPCA, griffin_lim_from_mel

    if threads:
        torch.set_num_threads(threads)
    if run is None and json_path is None:
        raise typer.BadParameter("give --json (or --run, whose report/ folder is the default)")
    ds = ClipDataset(data)
    with data_errors():
        _check_gate_splits(ds, "vae-embedding-report")
    base = "baseline_mel128_griffin_lim32"
    methods: dict[str, Any] = {base: lambda y: griffin_lim_from_mel(y, ds.sample_rate)}
    candidates: list[str] = []
    vae_id = None
    if run is not None:
        from .vae_run import load_vae_run

        vae, vcfg, vae_id = load_vae_run(run)
        k = max(1, round(vcfg.vae.latent_channels * MelPCA.hop / vcfg.vae.latent_hop))
        methods["vae"] = lambda y: vae.decode(vae.encode(y)[0])
        methods[f"baseline_mel_pca{k}_griffin_lim32"] = MelPCA(ds, k)
        candidates.append("vae")
    if config is not None or run is None:
        mcfg = load_model_config(config or "cpu")
        settings = [(mcfg.mel.syn_hop, mcfg.mel.iterations)]
        for v in (x.strip() for x in variants.split(",") if x.strip()):
            try:
                h, it = (int(p) for p in v.lower().split("x"))
            except ValueError:
                raise typer.BadParameter(f"{v!r} is not SYN_HOPxITERATIONS", param_hint="--variants") from None
            settings.append((h, it))
        for h, it in dict.fromkeys(settings):
            codec = MelCodec(dc.replace(mcfg.mel, syn_hop=h, iterations=it))
            name = f"mel{mcfg.mel.n_mels}_hop{mcfg.mel.hop}_fgla_h{h}_i{it}"
            methods[name] = lambda y, c=codec: c.decode(c.encode(y)[0])
            candidates.append(name)
    report = embedding_report(methods, ds, make_embedding(embedding, threads=threads or 1), max_train_clips)
    if vae_id is not None:
        report["vae_id"] = vae_id
    report["verdict"] = {c: adoption_verdict(report, c, [base], within_ci=True) for c in candidates}
    out = json_path or run / "report" / "test_embedding.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    typer.echo(json.dumps(report, indent=2))


@app.command("baseline-sweep")
def baseline_sweep(
    data: Path = _DATA,
    json_path: Path = typer.Option(..., "--json", help="write the sweep here"),
    components: str = typer.Option(
        "16,24,32,48,64,96", "--components", help="k values of the mel-PCA-k + Griffin-Lim codes"
    ),
    embedding: str = typer.Option("birdnet", "--embedding", help="birdnet | logmel | auto"),
    max_train_clips: int = typer.Option(800, "--max-train-clips", help="real training clips: reference set and probe"),
    threads: int = _THREADS,
) -> None:
    """How dense must a latent be to pass the adoption test? The no-training mel-PCA-k codes (k numbers per
    86 Hz mel frame, so k·86 numbers per second) beside mel128 + Griffin-Lim, in the evaluation embedding. A
    learned VAE at the same number of latent numbers per second should beat the PCA code of that rate."""
    import torch

    from .birdnet import make_embedding
    from .data import ClipDataset
    from .recon_embedding import embedding_report
    from .report import MelPCA, griffin_lim_from_mel

    ks = _positive_ints(components, "--components")
    if threads:
        torch.set_num_threads(threads)
    ds = ClipDataset(data)
    with data_errors():
        _check_gate_splits(ds, "baseline-sweep")
    methods: dict[str, Any] = {f"baseline_mel_pca{k}_griffin_lim32": MelPCA(ds, k) for k in ks}
    methods["baseline_mel128_griffin_lim32"] = lambda y: griffin_lim_from_mel(y, ds.sample_rate)
    report = embedding_report(methods, ds, make_embedding(embedding, threads=threads or 1), max_train_clips)
    report["numbers_per_s"] = {f"baseline_mel_pca{k}_griffin_lim32": k * ds.sample_rate / MelPCA.hop for k in ks} | {
        "baseline_mel128_griffin_lim32": MelPCA.n_mels * ds.sample_rate / MelPCA.hop
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    typer.echo(json.dumps(report, indent=2))


def _check_gate_splits(ds: ClipDataset, command: str) -> None:
    """The embedding reports need real test clips; without validation clips the probe keeps its first ridge."""
    from .data import check_splits

    ds.require("test", f"`train {command}` (it measures the round trip of the real test clips)")
    check_splits(ds, command, {"valid": "the probe's ridge is not chosen on validation clips"})


def _positive_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of integers", param_hint=option) from None
    if not values or min(values) < 1:
        raise typer.BadParameter(f"{text!r}: give at least one integer, all >= 1", param_hint=option)
    return values


@app.command()
def teacher(
    config: str = _CONFIG,
    data: Path = _DATA,
    vae_run: Path = typer.Option(
        None, "--vae", help="finished `train vae` run directory (only for a config whose latent is 'vae')"
    ),
    run: Path = _RUN,
    max_steps: int = _MAX_STEPS,
    resume: bool = _RESUME,
    dry_run: bool = _DRY,
    threads: int = _THREADS,
    steps: int = typer.Option(None, "--steps", help="override teacher_train.steps"),
    batch_size: int = typer.Option(None, "--batch-size", help="override teacher_train.batch_size (global)"),
    class_balance: float = typer.Option(
        None, "--class-balance", help="override teacher_train.class_balance (0 plain epochs, 0.5 square-root balance)"
    ),
    init_from: Path = typer.Option(
        None, "--init-from", help="start a new run from a teacher checkpoint's weights (e.g. models/teacher_model...)"
    ),
) -> None:
    """Train the EDM teacher over the config's normalised latent (mel code, or a VAE run's; cached first)."""
    from .teacher_train import resolve, train_teacher

    if dry_run:
        over = {"steps": steps, "batch_size": batch_size, "class_balance": class_balance}
        typer.echo(json.dumps(resolve(config, data, vae_run, **over)[2], indent=2))
        return
    with data_errors():
        train_teacher(
            config,
            data,
            vae_run,
            run,
            max_steps=max_steps,
            resume=resume,
            threads=threads,
            init_from=init_from,
            steps=steps,
            batch_size=batch_size,
            class_balance=class_balance,
        )


@app.command("sigma-profile")
def sigma_profile_cmd(
    checkpoint: Path = typer.Argument(..., help="a teacher (or student) model checkpoint"),
    data: Path = _DATA,
    clips: int = typer.Option(96, "--clips", help="held-out clips (valid + test) to score"),
    seed: int = typer.Option(0, "--seed"),
    json_path: Path = typer.Option(None, "--json", help="also write the report here"),
    threads: int = _THREADS,
) -> None:
    """Where along σ the model uses its caption: denoising error of held-out clips per σ with the true, the
    empty and a shuffled caption (train/sigma_profile.py says how to read it)."""
    import torch

    from .checkpoint import load_model_checkpoint
    from .data import ClipDataset
    from .sigma_profile import format_profile, sigma_profile

    if threads:
        torch.set_num_threads(threads)
    src = load_model_checkpoint(checkpoint)
    ds = ClipDataset(data)
    with data_errors():
        ds.check_matches(src.config.sample_rate, src.config.dit.latent_frames * src.config.latent_hop)
        report = sigma_profile(src, ds, n_clips=clips, seed=seed)
    report["checkpoint"] = str(checkpoint)
    typer.echo(format_profile(report))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")


@app.command("level-calibration")
def level_calibration_cmd(
    data: Path = _DATA,
    config: str = typer.Option("cpu", "--config", "-c", help="the model config whose mel code to use"),
    clips: int = typer.Option(229, "--clips", help="training clips to encode and decode"),
    json_path: Path = typer.Option(None, "--json", help="also write the report here"),
) -> None:
    """How well the runtime's level setting predicts a decoded peak from the mel code (train/level_calibration.py):
    real clips encoded, decoded, and their decoded peaks against the prediction."""
    from .data import ClipDataset
    from .level_calibration import format_calibration, level_calibration
    from .models.config import load_model_config

    cfg = load_model_config(config)
    if cfg.latent != "mel":
        raise typer.BadParameter(
            f"config {config!r} has latent = {cfg.latent!r}; the level setting is for the mel code"
        )
    with data_errors():
        report = level_calibration(ClipDataset(data), cfg.mel, n_clips=clips)
    typer.echo(format_calibration(report))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")


@app.command("prepare-latents")
def prepare_latents(
    data: Path = _DATA,
    vae_run: Path = typer.Option(..., "--vae", help="finished `train vae` run directory"),
    threads: int = _THREADS,
) -> None:
    """Encode every clip of a dataset once with a VAE (posterior means) into DATA/latents/<vae id>/."""
    import torch

    from .data import ClipDataset, cache_latents
    from .vae_run import load_vae_run

    if threads:
        torch.set_num_threads(threads)
    vae_model, _, vae_id = load_vae_run(vae_run)
    typer.echo(str(cache_latents(ClipDataset(data), vae_model, vae_id)))


# ----------------------------------------------------------------------------------------------------------
# CTM distillation (train/distill_train.py, train/ctm.py).


@app.command()
def distill(
    config: str = _CONFIG,
    teacher_run: Path = typer.Option(..., "--teacher", help="finished `train teacher` run directory"),
    data: Path = _DATA,
    run: Path = _RUN,
    max_steps: int = _MAX_STEPS,
    resume: bool = _RESUME,
    dry_run: bool = _DRY,
    threads: int = _THREADS,
    steps: int = typer.Option(None, "--steps", help="override [distill].steps"),
    batch_size: int = typer.Option(None, "--batch-size", help="override [distill].batch_size (global)"),
    distance: str = typer.Option(None, "--distance", help="override [distill].distance: teacher_features | l2"),
    max_n: int = typer.Option(None, "--max-n", help="override [distill].max_n (0 = N-1)"),
    ema_decay: float = typer.Option(
        None, "--ema-decay", help="override [distill].ema_decay, μ of the target θ⁻ (METHOD §3.6 says 0.999)"
    ),
    class_balance: float = typer.Option(
        None, "--class-balance", help="override [distill].class_balance (0 plain epochs, 0.5 square-root balance)"
    ),
) -> None:
    """Distil the teacher into a SoundCTM student (METHOD §3); ends with final/student_model.safetensors."""
    from .distill_train import resolve, train_distill

    over = {
        "steps": steps,
        "batch_size": batch_size,
        "distance": distance,
        "max_n": max_n,
        "ema_decay": ema_decay,
        "class_balance": class_balance,
    }
    if dry_run:
        typer.echo(json.dumps(resolve(config, teacher_run, data, **over)[2], indent=2))
        return
    with data_errors():
        train_distill(config, teacher_run, data, run, max_steps=max_steps, resume=resume, threads=threads, **over)


@app.command("distill-cost")
def distill_cost(
    config: str = _CONFIG,
    batch_size: int = typer.Option(32, "--batch-size", help="clips per iteration"),
    n: str = typer.Option("1,2,4,8", "--n", help="teacher solver step counts to time"),
    repeats: int = typer.Option(2, "--repeats", help="timed iterations per n (after one warm-up)"),
    threads: int = _THREADS,
    json_out: Path = typer.Option(None, "--json", help="also write the records here"),
) -> None:
    """Seconds per part of one distillation iteration at a config's sizes (random weights)."""
    import torch

    from .distill_train import DistillConfig, measure_iteration
    from .models.config import load_model_config
    from .stage import stage_table

    if threads:
        torch.set_num_threads(threads)
    dcfg = stage_table(config, DistillConfig, "distill")
    recs = measure_iteration(load_model_config(config), dcfg, batch_size, [int(x) for x in n.split(",")], repeats)
    text = json.dumps(recs, indent=1)
    if json_out:
        json_out.write_text(text)
    typer.echo(text)
