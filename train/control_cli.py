"""Intensity control on the command line: `soundctm-rt control generate` (takes shaped to a loudness curve by
the torch student) and `soundctm-rt eval-control` (the report). torch is imported inside the functions, so
importing this module stays cheap and torch-free."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from ..cli_runtime import fail, output_paths, unwritable, usage_error
from ..limits import clean_prompt

CONTROLS = ("noise-opt", "guidance")
SUBTYPES = ("PCM_16", "PCM_24", "FLOAT")
CHECKPOINT_HELP = (
    "student checkpoint, a `soundctm-rt-model/1` file: final/student_model.safetensors of `train distill`, or "
    "models/student_model.safetensors of a source checkout"
)

app = typer.Typer(no_args_is_help=True)


@app.callback()
def _control() -> None:
    """Shape a take's loudness over time with the torch student (METHOD §6): needs torch and a checkpoint."""


@dataclass(frozen=True)
class ControlRequest:
    """One `control generate`: the takes seed, seed+1, ... written to `paths`, shaped to `curve`.

    None leaves a sampling setting to the checkpoint's defaults (steps: `ControlConfig.guidance_steps` for loss
    guidance). `strength` scales both methods' step sizes (ControlConfig.noise_lr and guidance_rho).
    """

    prompt: str
    paths: tuple[Path, ...]
    curve: str  # a preset name, or a CSV/JSON file of (seconds, dBFS) points
    checkpoint: Path
    control: str = "noise-opt"
    steps: int | None = None
    gamma: float | None = None
    omega: float | None = None
    nu: float | None = None
    seed: int = 0
    duration: float | None = None  # seconds
    strength: float = 1.0
    threads: int | None = None
    subtype: str = "PCM_16"

    def __post_init__(self) -> None:
        if self.control not in CONTROLS:
            raise ValueError(f"--control must be {' or '.join(CONTROLS)}, not {self.control!r}")
        if not (math.isfinite(self.strength) and 0.0 < self.strength <= 10.0):
            raise ValueError(f"--control-strength must be in (0, 10], got {self.strength}")
        if self.subtype not in SUBTYPES:
            raise ValueError(f"--subtype must be {', '.join(SUBTYPES)}, not {self.subtype!r}")


@app.command("generate")
def generate_command(
    prompt: str = typer.Argument(..., help="What to hear, e.g. 'a dog barking'."),
    intensity: str = typer.Option(
        ...,
        "--intensity",
        help="The loudness curve: a preset (fade-in, swell, decay, pulse) or a CSV/JSON file of (seconds, dB) points.",
    ),
    checkpoint: Path = typer.Option(..., "--checkpoint", help=CHECKPOINT_HELP),
    output: Path = typer.Option(
        Path("out.wav"),
        "--output",
        "-o",
        help="WAV file to write; with --variations K, K files NAME_000.wav ... or, if the path is a folder, files "
        "inside it.",
    ),
    control: str = typer.Option("noise-opt", "--control", help="noise-opt or guidance."),
    strength: float = typer.Option(
        1.0,
        "--control-strength",
        help="Scales both methods' step sizes. 1 keeps the prompt's sound on the test prompts (docs/control.md); "
        "more follows the curve closer and changes the sound more.",
    ),
    steps: int | None = typer.Option(None, help="Student steps (default: 1 for noise-opt, 4 for guidance)."),
    gamma: float | None = typer.Option(None, help="γ in [0, 1] (guidance only; noise-opt samples with γ = 0)."),
    cfg: float | None = typer.Option(None, "--cfg", "--omega", help="Guidance scale ω the student was trained on."),
    nu: float | None = typer.Option(None, help="ν-guidance of the student (1 = none)."),
    seed: int = typer.Option(0, min=0, help="Seed of all noise: take k uses seed + k, the runtime's noise."),
    duration: float | None = typer.Option(None, help="Seconds (at most the model's clip length)."),
    variations: int = typer.Option(1, min=1, max=1024, help="K takes with seeds seed, seed+1, ..."),
    threads: int | None = typer.Option(None, min=1, help="torch threads (default: torch's choice)."),
    subtype: str = typer.Option("PCM_16", "--subtype", help="WAV subtype: PCM_16, PCM_24 or FLOAT."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON record per file."),
) -> None:
    """Generate takes whose loudness follows a curve: noise optimisation or loss guidance through the torch
    student; each file's line gives its dB RMSE to the curve beside the uncontrolled take's."""
    if output.suffix.lower() != ".wav" and not (variations > 1 and (output.is_dir() or output.suffix == "")):
        raise usage_error(f"--output must end in .wav (or be a folder with --variations), got {output}")
    try:
        req = ControlRequest(
            prompt=clean_prompt(prompt),
            paths=tuple(output_paths(output, variations)),
            curve=intensity,
            checkpoint=checkpoint,
            control=control,
            steps=steps,
            gamma=gamma,
            omega=cfg,
            nu=nu,
            seed=seed,
            duration=duration,
            strength=strength,
            threads=threads,
            subtype=subtype,
        )
    except ValueError as e:
        raise usage_error(str(e)) from None
    for why in map(unwritable, req.paths):  # before any work: a take must not be lost at the last step
        if why:
            raise fail(why)
    for rec in generate_controlled(req):
        if json_out:
            typer.echo(json.dumps(rec))
        else:
            typer.echo(
                f"{rec['file']}  {rec['seconds']:.2f} s  {req.control}: intensity {rec['db_rmse']:.1f} dB RMSE from "
                f"the target (uncontrolled {rec['db_rmse_uncontrolled']:.1f} dB), {rec['control_seconds']:.1f} s"
            )


def generate_controlled(req: ControlRequest) -> list[dict[str, Any]]:
    """Write the takes of a request, shaped to its curve (METHOD §6); one record per file.

    Raises:
        typer.Exit: 1 when the checkpoint cannot be read or a file cannot be written; 2 for a curve or a
            sampling setting the model refuses.
    """
    import numpy as np
    import soundfile as sf
    import torch

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

    if req.threads:
        torch.set_num_threads(req.threads)
    try:
        src = load_model_checkpoint(req.checkpoint)
    except (OSError, ValueError) as exc:
        raise fail(str(exc)) from None
    mc = src.config
    T, C, rate, sr = mc.dit.latent_frames, mc.latent_channels, mc.latent_rate, mc.sample_rate
    clip = T * mc.latent_hop / sr
    base_cfg = ControlConfig()
    cc = dataclasses.replace(
        base_cfg, noise_lr=base_cfg.noise_lr * req.strength, guidance_rho=base_cfg.guidance_rho * req.strength
    )
    try:
        p = _check(req, cc, mc.edm, clip)
        pts, what = load_curve(req.curve, clip)
    except (ValueError, CurveError) as exc:
        raise usage_error(str(exc)) from None
    frames_t = (np.arange(T) + 0.5) / rate
    mask = torch.from_numpy(frames_t < p["duration"])  # frames past --duration are cut, so they do not count
    K = len(req.paths)
    target = torch.from_numpy(resample(pts, T, rate))[None].expand(K, T)
    draws = [draw_noise(req.seed + k, (1, C, T), p["steps"]) for k in range(K)]  # the runtime's noise of each take
    eps_T = torch.cat([torch.from_numpy(d[0]) for d in draws])
    noises = [torch.cat([torch.from_numpy(d[1][i]) for d in draws]) for i in range(p["steps"] - 1)]
    cond = encode_prompts(src.text, [req.prompt] * K, mc.text.max_length)
    uncond = encode_prompts(src.text, [""], mc.text.max_length).expand(K)
    jump = student_jump(src, cond, uncond, p["omega"], p["nu"])
    base = sample_uncontrolled(src, jump, eps_T, noises, p["steps"], p["gamma"])
    if req.control == "noise-opt":
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
    records = []
    try:
        req.paths[0].parent.mkdir(parents=True, exist_ok=True)
        for k, out in enumerate(req.paths):
            sf.write(str(out), y[k, :n].numpy(), sr, subtype=req.subtype)
            records.append(
                {
                    "file": str(out),
                    "seed": req.seed + k,
                    "seconds": n / sr,
                    "control": req.control,
                    "curve": what,
                    "steps": p["steps"],
                    "gamma": p["gamma"],
                    "db_rmse": round(float(err[k]), 3),
                    "db_rmse_uncontrolled": round(float(err0[k]), 3),
                    "gain_db": round(float(gain[k]), 2),
                    "strength": req.strength,
                    "control_seconds": round(res.seconds / K, 3),
                }
            )
    except (OSError, RuntimeError) as exc:  # soundfile reports its own failures as RuntimeError
        raise fail(f"cannot write the takes: {exc}") from None
    return records


def _check(req: ControlRequest, cc: Any, e: Any, clip: float) -> dict[str, Any]:
    """Validated sampling settings of a request (the ranges of the runtime Engine's). Raises ValueError."""
    steps = req.steps
    if steps is None:
        steps = e.default_steps if req.control == "noise-opt" else cc.guidance_steps
    if not 1 <= steps <= 64:
        raise ValueError(f"steps must be in [1, 64], got {steps}")
    if req.control == "guidance" and steps < 2:
        raise ValueError("--control guidance nudges the sample between steps: use --steps 2 or more")
    g = e.default_gamma if req.gamma is None else req.gamma
    if not 0.0 <= g <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {g}")
    if req.control == "noise-opt" and g != 0.0:
        raise ValueError("--control noise-opt samples deterministically (γ = 0) from the optimised noise: drop --gamma")
    w = e.default_omega if req.omega is None else req.omega
    if not math.isfinite(w) or not e.omega_min <= w <= e.omega_max:
        raise ValueError(
            f"omega (cfg) must be finite and in the range the student was trained on, [{e.omega_min}, {e.omega_max}]"
        )
    v = e.default_nu if req.nu is None else req.nu
    if not 0.0 <= v <= 20.0:
        raise ValueError(f"nu must be in [0, 20], got {v}")
    d = clip if req.duration is None else req.duration
    if not 0.0 < d <= clip + 1e-9:
        raise ValueError(f"duration must be in (0, {clip:.3f}] seconds for this model, got {d}")
    return {"steps": steps, "gamma": g, "omega": w, "nu": v, "duration": d}


def eval_control_command(
    checkpoint: Path = typer.Option(..., "--checkpoint", help=CHECKPOINT_HELP),
    data: Path = typer.Option(..., "--data", help="prepared dataset directory (its test split gives the prompts)"),
    json_path: Path = typer.Option(..., "--json", help="write the result here"),
    markdown_path: Path = typer.Option(None, "--markdown", help="also write the report as Markdown"),
    png: Path = typer.Option(None, "--png", help="also draw target vs achieved curves over spectrograms"),
    prompts: int = typer.Option(24, "--prompts", min=1, help="test prompts, one class label each"),
    steps: int = typer.Option(4, "--steps", min=2, help="the common step count of the three methods"),
    seed: int = typer.Option(0, "--seed", min=0, help="prompt k uses seed + k"),
    noise_iterations: int = typer.Option(None, "--noise-iterations", help="(a) Adam iterations"),
    noise_lr: float = typer.Option(None, "--noise-lr", help="(a) Adam step size"),
    noise_through_sampler: bool = typer.Option(
        None,
        "--noise-through-sampler/--one-step-map",
        help="(a) differentiate the take of the row's step count (default), or METHOD §6's one-step map",
    ),
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
            "noise_through_sampler": noise_through_sampler,
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
    from .birdnet import make_embedding
    from .checkpoint import load_model_checkpoint
    from .cli import evaluation_dataset
    from .control_eval import evaluate_control, markdown

    ds = evaluation_dataset(
        data, threads, "eval-control", "its prompts", "the probe's ridge is not chosen on validation clips"
    )
    try:
        src = load_model_checkpoint(checkpoint)
    except (OSError, ValueError) as exc:
        raise fail(str(exc)) from None
    result = evaluate_control(
        src,
        ds,
        make_embedding(cfg.embedding, threads=threads or 1),
        cfg,
        png=png,
        paths={"checkpoint": str(checkpoint.resolve()), "data": str(data.resolve())},
    )
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1))
    md_dir = (markdown_path or json_path).resolve().parent
    md = markdown(result, os.path.relpath(png.resolve(), md_dir) if png is not None else None)
    if markdown_path is not None:
        markdown_path.parent.mkdir(parents=True, exist_ok=True)
        markdown_path.write_text(md)
    typer.echo(md)
