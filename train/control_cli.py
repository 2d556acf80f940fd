"""Intensity control on the command line: `soundctm-rt generate --intensity` (the torch path behind the runtime's
command) and `soundctm-rt eval-control` (the report). torch is imported inside the functions, so importing this
module stays cheap and torch-free."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import typer

REPO_CHECKPOINT = Path("models") / "student_model.safetensors"
CONTROLS = ("noise-opt", "guidance")


def default_checkpoint_path() -> Path | None:
    """The student checkpoint shipped with a source checkout (models/student_model.safetensors at the repository
    root; not in the wheel), if there is one."""
    p = Path(__file__).resolve().parent.parent / REPO_CHECKPOINT  # train/ sits at the repository root
    return p if p.is_file() else None


def _fail(msg: str) -> typer.Exit:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    return typer.Exit(2)


def resolve_checkpoint(checkpoint: Path | None) -> Path:
    if checkpoint is not None:
        return checkpoint
    default = default_checkpoint_path()
    if default is None:
        raise _fail(
            "--intensity runs the torch student: pass --checkpoint PATH (a `soundctm-rt-model/1` file, e.g. "
            f"final/student_model.safetensors of `train distill`); this checkout has no {REPO_CHECKPOINT}"
        )
    return default


def generate_controlled(
    prompt: str,
    paths: list[Path],
    curve: str,
    control: str,
    checkpoint: Path | None,
    steps: int | None,
    gamma: float | None,
    omega: float | None,
    nu: float | None,
    seed: int,
    duration: float | None,
    threads: int | None,
    subtype: str,
    json_out: bool,
    strength: float = 1.0,
) -> None:
    """`generate --intensity`: the takes seed, seed+1, ... of `paths`, shaped to the curve (METHOD §6).
    strength scales the step sizes of both methods (ControlConfig.noise_lr and guidance_rho)."""
    if control not in CONTROLS:
        raise _fail(f"--control must be {' or '.join(CONTROLS)}, not {control!r}")
    if not 0.0 < strength <= 10.0:
        raise _fail(f"--control-strength must be in (0, 10], got {strength}")
    path = resolve_checkpoint(checkpoint)
    try:
        import torch
    except ImportError:
        raise _fail("--intensity needs torch (pip install torch, then pip install '.[train]')") from None
    import numpy as np
    import soundfile as sf

    from ..sampling import draw_noise
    from .checkpoint import load_model_checkpoint
    from .conditioning import encode_prompts
    from .control import (
        ControlConfig,
        db_rmse,
        intensity_db,
        sample_loss_guided,
        sample_noise_optimised,
        sample_uncontrolled,
        student_jump,
        with_level,
    )
    from .control_curves import CurveError, load_curve, resample

    if threads:
        torch.set_num_threads(threads)
    try:
        src = load_model_checkpoint(path)
    except (FileNotFoundError, ValueError) as exc:
        raise _fail(str(exc)) from None
    mc = src.config
    T, C, rate, sr = mc.dit.latent_frames, mc.latent_channels, mc.latent_rate, mc.sample_rate
    clip = T * mc.latent_hop / sr
    base_cfg = ControlConfig()
    cc = dataclasses.replace(
        base_cfg, noise_lr=base_cfg.noise_lr * strength, guidance_rho=base_cfg.guidance_rho * strength
    )
    p = _check(steps, gamma, omega, nu, duration, control, cc, mc.edm, clip)
    try:
        pts, what = load_curve(curve, clip)
    except CurveError as exc:
        raise _fail(str(exc)) from None
    frames_t = (np.arange(T) + 0.5) / rate
    mask = torch.from_numpy(frames_t < p["duration"])  # frames past --duration are cut, so they do not count
    K = len(paths)
    target = torch.from_numpy(resample(pts, T, rate))[None].expand(K, T)
    draws = [draw_noise(seed + k, (1, C, T), p["steps"]) for k in range(K)]  # the runtime's noise of each take
    eps_T = torch.cat([torch.from_numpy(d[0]) for d in draws])
    noises = [torch.cat([torch.from_numpy(d[1][i]) for d in draws]) for i in range(p["steps"] - 1)]
    cond = encode_prompts(src.text, [prompt] * K, mc.text.max_length)
    uncond = encode_prompts(src.text, [""], mc.text.max_length).expand(K)
    jump = student_jump(src, cond, uncond, p["omega"], p["nu"])
    base = sample_uncontrolled(src, jump, eps_T, noises, p["steps"], p["gamma"])
    if control == "noise-opt":
        res = sample_noise_optimised(src, jump, eps_T, target, p["steps"], cc, mask)
    else:
        res = sample_loss_guided(src, jump, eps_T, noises, target, p["steps"], p["gamma"], cc, mask)
    with torch.no_grad():
        y0, y = src.decode(base.x0), src.decode(res.x0)
        gain = torch.zeros(K)
        if cc.match_level:  # the curve's shape was controlled; a gain sets its level (train.control)
            y, gain = with_level(y, target, mc.latent_hop, mask)
        err0 = db_rmse(intensity_db(y0, mc.latent_hop), target, mask)
        err = db_rmse(intensity_db(y, mc.latent_hop), target, mask)
    n = round(p["duration"] * sr)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for k, out in enumerate(paths):
        sf.write(str(out), y[k, :n].numpy(), sr, subtype=subtype)
        rec: dict[str, Any] = {
            "file": str(out),
            "seed": seed + k,
            "control": control,
            "curve": what,
            "steps": p["steps"],
            "gamma": p["gamma"],
            "db_rmse": round(float(err[k]), 3),
            "db_rmse_uncontrolled": round(float(err0[k]), 3),
            "gain_db": round(float(gain[k]), 2),
            "strength": strength,
            "control_seconds": round(res.seconds / K, 3),
        }
        if json_out:
            typer.echo(json.dumps(rec))
        else:
            typer.echo(
                f"{out}  {n / sr:.2f} s  {control}: intensity {rec['db_rmse']:.1f} dB RMSE from the target "
                f"(uncontrolled {rec['db_rmse_uncontrolled']:.1f} dB), {rec['control_seconds']:.1f} s"
            )


def _check(
    steps: int | None,
    gamma: float | None,
    omega: float | None,
    nu: float | None,
    duration: float | None,
    control: str,
    cc: Any,
    e: Any,
    clip: float,
) -> dict[str, Any]:
    """Validated parameters of the torch path (the same ranges as the runtime Engine's)."""
    import math

    if steps is None:
        steps = e.default_steps if control == "noise-opt" else cc.guidance_steps
    if not 1 <= steps <= 64:
        raise _fail(f"steps must be in [1, 64], got {steps}")
    if control == "guidance" and steps < 2:
        raise _fail("--control guidance nudges the sample between steps: use --steps 2 or more")
    g = e.default_gamma if gamma is None else gamma
    if not 0.0 <= g <= 1.0:
        raise _fail(f"gamma must be in [0, 1], got {g}")
    if control == "noise-opt" and g != 0.0:
        raise _fail("--control noise-opt samples deterministically (γ = 0) from the optimised noise: drop --gamma")
    w = e.default_omega if omega is None else omega
    if not math.isfinite(w) or not e.omega_min <= w <= e.omega_max:
        raise _fail(
            f"omega (cfg) must be finite and in the range the student was trained on, [{e.omega_min}, {e.omega_max}]"
        )
    v = e.default_nu if nu is None else nu
    if not 0.0 <= v <= 20.0:
        raise _fail(f"nu must be in [0, 20], got {v}")
    d = clip if duration is None else duration
    if not 0.0 < d <= clip + 1e-9:
        raise _fail(f"duration must be in (0, {clip:.3f}] seconds for this model, got {d}")
    return {"steps": steps, "gamma": g, "omega": w, "nu": v, "duration": d}


def eval_control_command(
    checkpoint: Path = typer.Option(
        None, "--checkpoint", help="student checkpoint (default: models/student_model.safetensors of the checkout)"
    ),
    data: Path = typer.Option(..., "--data", help="prepared dataset directory (its test split gives the prompts)"),
    json_path: Path = typer.Option(..., "--json", help="write the result here"),
    markdown_path: Path = typer.Option(None, "--markdown", help="also write the report as Markdown"),
    png: Path = typer.Option(None, "--png", help="also draw target vs achieved curves over spectrograms"),
    prompts: int = typer.Option(24, "--prompts", min=1, help="test prompts, one class label each"),
    steps: int = typer.Option(4, "--steps", min=2, help="the common step count of the three methods"),
    seed: int = typer.Option(0, "--seed", min=0, help="prompt k uses seed + k"),
    noise_iterations: int = typer.Option(None, "--noise-iterations", help="(a) Adam iterations"),
    noise_lr: float = typer.Option(None, "--noise-lr", help="(a) Adam step size"),
    guidance_iterations: int = typer.Option(None, "--guidance-iterations", help="(b) nudges before each jump"),
    guidance_rho: float = typer.Option(None, "--guidance-rho", help="(b) nudge size relative to t"),
    timbre_weight: float = typer.Option(None, "--timbre-weight", help="weight of the timbre anchor (0: off)"),
    match_level: bool = typer.Option(
        None, "--match-level/--absolute-level", help="control the curve's shape and set the level by a gain"
    ),
    embedding: str = typer.Option("birdnet", "--embedding", help="birdnet | logmel | auto"),
    max_train_clips: int = typer.Option(800, "--max-train-clips", help="training clips the probe is fitted on"),
    batch: int = typer.Option(16, "--batch", min=1, help="cases per batch"),
    threads: int = typer.Option(None, "--threads", help="torch and BirdNET threads"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved config and exit"),
) -> None:
    """Intensity control report: dB RMSE to preset curves for uncontrolled sampling, noise optimisation and loss
    guidance; its cost; probe adherence before and after control; a PNG of a few cases."""
    from .control import ControlConfig
    from .control_eval import ControlEvalConfig

    overrides: dict[str, Any] = {
        k: v
        for k, v in {
            "noise_iterations": noise_iterations,
            "noise_lr": noise_lr,
            "guidance_iterations": guidance_iterations,
            "guidance_rho": guidance_rho,
            "timbre_weight": timbre_weight,
            "match_level": match_level,
        }.items()
        if v is not None
    }
    try:
        cfg = ControlEvalConfig(
            prompts=prompts,
            steps=steps,
            seed=seed,
            batch=batch,
            max_train_clips=max_train_clips,
            embedding=embedding,
            control=ControlConfig(**overrides),
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if dry_run:
        typer.echo(json.dumps(dataclasses.asdict(cfg), indent=2))
        return
    path = resolve_checkpoint(checkpoint)
    import torch

    from .birdnet import make_embedding
    from .checkpoint import load_model_checkpoint
    from .cli import data_errors
    from .control_eval import evaluate_control, markdown
    from .data import ClipDataset, check_splits

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if threads:
        torch.set_num_threads(threads)
    ds = ClipDataset(data)
    with data_errors():
        ds.require("test", "`soundctm-rt eval-control` (its prompts)")
        check_splits(ds, "eval-control", {"valid": "the probe's ridge is not chosen on validation clips"})
    src = load_model_checkpoint(path)
    result = evaluate_control(
        src,
        ds,
        make_embedding(cfg.embedding, threads=threads or 1),
        cfg,
        png=png,
        paths={"checkpoint": str(path.resolve()), "data": str(data.resolve())},
    )
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1))
    md_dir = (markdown_path or json_path).resolve().parent
    md = markdown(result, os.path.relpath(png.resolve(), md_dir) if png is not None else None)
    if markdown_path is not None:
        markdown_path.parent.mkdir(parents=True, exist_ok=True)
        markdown_path.write_text(md)
    typer.echo(md)
