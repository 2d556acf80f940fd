"""Stage 3: distil the EDM teacher into a SoundCTM student (METHOD §2-§3), ending with the export checkpoint.

Inputs: a finished teacher run (final/teacher_model.safetensors: teacher, VAE, latent statistics, config) and
the prepared dataset whose latents it was trained on (DATA/latents/<vae id>/, cached here if missing).
The student is a parameter-by-parameter copy of the teacher (METHOD §2); θ⁻ is its EMA (μ = 0.999, updated
after every optimiser step), which is both the stop-gradient target of METHOD §3.6 and the exported model.

One iteration (train.ctm): n ~ P(n) ∝ n, (t, u, s, ω) per example, n CFG-guided Heun teacher steps t → u,
x_tgt = G_θ⁻(x_u, u, s), x_est = G_θ(x_t, t, s), the teacher-feature (or L2) distance at s, DSM with the
adaptive weight, RAdam at a constant lr. The seconds of each part are logged (time_* in log.jsonl), and
`measure_iteration` times one iteration of any config on random weights (`train distill-cost`).

Final files: final/student_model.safetensors — the train.checkpoint format (student EMA + VAE + latent
statistics + config with the trained ω range), fp16, which `soundctm-rt export` reads — and a few samples.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import (
    STUDENT_CHECKPOINT,
    TEACHER_CHECKPOINT,
    ModelSource,
    build_networks,
    load_model_checkpoint,
    perturb_zero_init,
    save_model_checkpoint,
)
from .conditioning import CaptionTable, encode_prompts, sample_prompts
from .ctm import (
    DISTANCES,
    CTMLoss,
    PartTimer,
    cfg_teacher_denoiser,
    expected_teacher_passes,
    grid_sigmas,
    sample_dsm_sigma,
    sample_grid_indices,
    sample_n,
    sample_omega,
    student_from_teacher,
    teacher_solve,
)
from .data import ClipDataset, balanced_items, cache_latents, check_splits, clip_labels
from .latent import normalise
from .loop import EMA, DistEnv, RunDir, barrier, shard, step_generator, wrap_ddp
from .models.config import EDMConfig, ModelConfig, load_model_config
from .models.denoiser import Conditioning, CTMDenoiser
from .stage import Stage, StageConfig, TrainState, distributed_job, run_stage, stage_table

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillConfig(StageConfig):
    """The [distill] table: METHOD §3 settings and the documented scale switches."""

    steps: int = 30000  # METHOD §3.10: ~30k iterations in the releases
    batch_size: int = 32  # global batch of clips
    lr: float = 8e-5  # METHOD §3.10: RAdam, constant, no weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # RAdam defaults
    ema_decay: float = 0.999  # METHOD §3.6: μ of θ⁻, updated after every optimiser step
    caption_dropout: float = 0.1  # METHOD §3.1
    class_balance: float = 0.0  # repeat-factor power per clip label (data.class_repeat_factors); 0: plain epochs
    N: int = 40  # METHOD §1: Karras grid points of training (k = 0 is σ_max)
    max_n: int = 0  # largest teacher solver step count; 0 = N − 1 (METHOD §3.2); smaller is a CPU-scale cap
    distance: str = "teacher_features"  # METHOD §3.7; "l2" is the ablation
    omega_min: float = 0.0  # ω range (METHOD §3.3); 0 and 0 = take [edm].omega_min/omega_max
    omega_max: float = 0.0
    default_omega: float = 0.0  # the student's default ω; 0 = [edm].default_omega clamped into the range
    lambda_dsm: float = 0.2  # METHOD §3.9: 0.2 as in the DiT release (our network is a DiT); 1.0 in the UNet one
    dsm_karras_r_max: float = 0.7  # METHOD §3.8: r ~ U[0, 0.7] for the Karras half of the DSM σ
    time_parts: bool = True  # time each part of the iteration (synchronises CUDA around parts)
    sample_prompts: tuple[str, ...] = ()  # empty: 8 captions of the test split (of train, without test clips)
    sample_steps: tuple[int, ...] = (1, 2, 4)  # γ = 0 samples written at the end
    sample_seed: int = 1234

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("[distill] steps and batch_size must be >= 1")
        if self.N < 2:
            raise ValueError("[distill] N must be >= 2")
        if not 0 <= self.max_n <= self.N - 1:
            raise ValueError(f"[distill] max_n must be in [0, N-1 = {self.N - 1}] (0 means N-1)")
        if self.distance not in DISTANCES:
            raise ValueError(f"[distill] distance must be one of {DISTANCES}, not {self.distance!r}")
        if not 0.0 <= self.caption_dropout < 1.0 or not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("[distill] caption_dropout and ema_decay must be in [0, 1)")
        if self.omega_max < self.omega_min or self.omega_min < 0:
            raise ValueError("[distill] need 0 <= omega_min <= omega_max")
        if self.default_omega and not self.omega_min <= self.default_omega <= (self.omega_max or float("inf")):
            raise ValueError("[distill] default_omega must lie in [omega_min, omega_max]")
        if not 0.0 <= self.dsm_karras_r_max <= 1.0 or self.lambda_dsm < 0:
            raise ValueError("[distill] dsm_karras_r_max must be in [0, 1] and lambda_dsm >= 0")
        if self.class_balance < 0:
            raise ValueError("[distill] class_balance must be >= 0")

    @property
    def n_max(self) -> int:
        """The effective largest n."""
        return self.max_n or self.N - 1

    def omega_range(self, edm: EDMConfig) -> tuple[float, float]:
        """(ω_min, ω_max) of training: this table's, or the [edm] one when both are 0."""
        if self.omega_min == 0.0 and self.omega_max == 0.0:
            return edm.omega_min, edm.omega_max
        return self.omega_min, self.omega_max


def student_model_config(model_cfg: ModelConfig, dcfg: DistillConfig) -> ModelConfig:
    """The model config written with the student: [edm]'s ω range is the one the student was trained on."""
    lo, hi = dcfg.omega_range(model_cfg.edm)
    edm = model_cfg.edm
    default = dcfg.default_omega or min(max(edm.default_omega, lo), hi)
    if not lo <= default <= hi:
        raise ValueError(f"[distill] default_omega {default} outside the ω range [{lo}, {hi}]")
    return dataclasses.replace(
        model_cfg, edm=dataclasses.replace(edm, omega_min=lo, omega_max=hi, default_omega=default)
    )


def teacher_checkpoint_path(teacher: str | Path) -> Path:
    """A teacher run directory (its final/teacher_model.safetensors) or the checkpoint file itself."""
    p = Path(teacher)
    path = p if p.is_file() else p / "final" / TEACHER_CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {teacher} a finished `train teacher` run?")
    return path


def resolve(
    config: str | Path, teacher: str | Path, data: str | Path, **overrides: Any
) -> tuple[ModelConfig, DistillConfig, dict]:
    """Model config, [distill] (with CLI overrides) and the resolved dictionary saved in the run dir."""
    model_cfg = load_model_config(config)
    dcfg = stage_table(config, DistillConfig, "distill", **overrides)
    lo, hi = dcfg.omega_range(model_cfg.edm)
    resolved = {
        "stage": "distill",
        "config_source": str(config),
        "data": str(Path(data).resolve()),
        "teacher": str(teacher_checkpoint_path(teacher).resolve()) if Path(teacher).exists() else str(teacher),
        "model": student_model_config(model_cfg, dcfg).to_dict(),
        "distill": dataclasses.asdict(dcfg),
        "derived": {
            "n_max": dcfg.n_max,
            "omega_range": [lo, hi],
            "expected_teacher_passes_per_iteration": expected_teacher_passes(dcfg.n_max),
        },
    }
    return model_cfg, dcfg, resolved


def check_same_architecture(a: ModelConfig, b: ModelConfig, what: str) -> None:
    if a.latent == "mel" and a.mel.code_fields() != b.mel.code_fields():  # decoder settings may differ
        raise ValueError(f"{what}: [mel] differs: {a.mel.code_fields()} vs {b.mel.code_fields()}")
    for part in ("latent", "vae", "text", "dit"):
        if getattr(a, part) != getattr(b, part):
            raise ValueError(f"{what}: [{part}] differs: {getattr(a, part)} vs {getattr(b, part)}")
    for k in ("sigma_min", "sigma_max", "rho", "sigma_data"):
        if getattr(a.edm, k) != getattr(b.edm, k):
            raise ValueError(f"{what}: edm.{k} differs")


# ------------------------------------------------------------------------------------------- iteration


@dataclass
class Draws:
    """Every random draw of one iteration, for the global batch (sharded per rank by `local`)."""

    n: int
    i_t: torch.Tensor  # [B] long
    i_s: torch.Tensor  # [B] long
    omega: torch.Tensor  # [B]
    eps: torch.Tensor  # [B, C, T]
    drop: torch.Tensor  # [B] bool: caption -> ""
    sigma_dsm: torch.Tensor  # [B]
    eps_dsm: torch.Tensor  # [B, C, T]

    def local(self, env: DistEnv) -> Draws:
        """This rank's rows."""
        return Draws(self.n, *(shard(getattr(self, f.name), env) for f in dataclasses.fields(self)[1:]))

    def to(self, device: str) -> Draws:
        return Draws(self.n, *(getattr(self, f.name).to(device) for f in dataclasses.fields(self)[1:]))


def draw(dcfg: DistillConfig, edm: EDMConfig, batch: int, channels: int, frames: int, gen: torch.Generator) -> Draws:
    """One iteration's draws (METHOD §3.1-3.3, §3.8), a function of the generator only."""
    n = sample_n(dcfg.n_max, gen)
    i_t, i_s = sample_grid_indices(n, dcfg.N, batch, gen)
    lo, hi = dcfg.omega_range(edm)
    omega = sample_omega(batch, lo, hi, gen)
    eps = torch.randn(batch, channels, frames, generator=gen)
    drop = torch.rand(batch, generator=gen) < dcfg.caption_dropout
    sigma_dsm = sample_dsm_sigma(batch, edm, dcfg.dsm_karras_r_max, gen)
    eps_dsm = torch.randn(batch, channels, frames, generator=gen)
    return Draws(n, i_t, i_s, omega, eps, drop, sigma_dsm, eps_dsm)


def iteration(
    lossmod: torch.nn.Module,
    student: CTMDenoiser,
    teacher: CTMDenoiser,
    ema: EMA,
    opt: torch.optim.Optimizer,
    x0: torch.Tensor,
    cond: Conditioning,
    uncond: Conditioning,
    d: Draws,
    grid: torch.Tensor,
    timer: PartTimer,
) -> dict[str, float]:
    """One optimiser step of METHOD §3 on this rank's rows. x0 [b, C, T] normalised latents; cond already
    caption-dropped. Returns the scalar metrics."""
    t, u, s = grid[d.i_t], grid[d.i_t + d.n], grid[d.i_s]  # METHOD §3.2
    x_t = x0 + t[:, None, None] * d.eps
    with torch.no_grad():
        with timer.part("teacher_solver"):
            x_u = teacher_solve(cfg_teacher_denoiser(teacher, cond, uncond, d.omega), x_t, grid, d.i_t, d.n)
        with timer.part("ema_target"):
            x_tgt = ema.model.G(x_u, u, s, cond, d.omega)  # METHOD §3.6
    loss, parts = lossmod(x_t, t, s, x_tgt, cond, d.omega, x0, d.sigma_dsm, d.eps_dsm, timer)
    with timer.part("backward"):
        opt.zero_grad(set_to_none=True)
        loss.backward()
    with timer.part("optimizer"):
        opt.step()
    with timer.part("ema_update"):
        ema.update(student)  # METHOD §3.6: after every optimiser step
    if not torch.isfinite(loss):
        raise FloatingPointError("non-finite distillation loss")
    return {"loss": float(loss.detach()), "n": float(d.n), **{k: float(v) for k, v in parts.items()}}


# ---------------------------------------------------------------------------------------------- training


def load_teacher(teacher: str | Path) -> ModelSource:
    """The teacher's ModelSource (teacher network in the student slot, VAE, statistics, config), frozen."""
    src = load_model_checkpoint(teacher_checkpoint_path(teacher))
    src.student.requires_grad_(False).eval()
    return src


def train_distill(
    config: str | Path,
    teacher: str | Path,
    data: str | Path,
    run: str | Path,
    max_steps: int | None = None,
    resume: bool = False,
    threads: int | None = None,
    **overrides: Any,
) -> Path:
    """Distil (or resume) a student run; returns the run directory."""
    with distributed_job(threads) as env:
        model_cfg, dcfg, resolved = resolve(config, teacher, data, **overrides)
        src = load_teacher(teacher)
        check_same_architecture(src.config, model_cfg, f"teacher {teacher} vs config {config}")
        ds = ClipDataset(data)
        ds.check_matches(model_cfg.sample_rate, model_cfg.dit.latent_frames * model_cfg.latent_hop)
        prompts_from_test = bool(dcfg.sample_steps) and not dcfg.sample_prompts
        check_splits(
            ds,
            "train distill",
            {"test": "the samples' prompts are training captions"} if prompts_from_test else {},
            batch_size=dcfg.batch_size,
        )
        vae_id = str(src.provenance.get("latent_id") or src.provenance.get("vae_id", "teacher-vae"))
        if env.is_main:
            cache_latents(ds, src.codec, vae_id)  # idempotent: reuses the teacher's cache
        barrier(env)
        latents = np.load(ds.root / "latents" / vae_id / "latents.npy", mmap_mode="r")
        rd = RunDir(run, env)
        ckpt = rd.start(resolved, resume)
        provenance = {
            "stage": "distill",
            "teacher": resolved["teacher"],
            "teacher_provenance": src.provenance,
            "vae_id": vae_id,
            "distill": dataclasses.asdict(dcfg),
        }
        end_step = max_steps or dcfg.steps

        dev = env.device
        table = CaptionTable(src.text, ds.captions, model_cfg.text.max_length)
        teacher_net = src.student.to(dev)
        student = student_from_teacher(teacher_net).to(dev)  # METHOD §2
        ema = EMA(student, dcfg.ema_decay)
        opt = torch.optim.RAdam(student.parameters(), lr=dcfg.lr, betas=dcfg.betas, weight_decay=0.0)  # §3.10
        state = TrainState({"model": student, "ema": ema}, opt)
        lossmod = wrap_ddp(CTMLoss(student, teacher_net, dcfg.distance, dcfg.lambda_dsm), env)
        grid = grid_sigmas(dcfg.N, model_cfg.edm).to(dev)
        train_clips = ds.indices("train")
        train_idx = balanced_items(clip_labels(ds), train_clips, dcfg.class_balance)
        cap_rows = table.rows(ds.captions)
        c, T = model_cfg.latent_channels, model_cfg.dit.latent_frames
        mu, std = src.latent_mean, src.latent_std
        logger.info(
            "distill: student %.2f M params, %d training clips (%d per epoch), N=%d, n<=%d "
            "(E[2n]=%.1f teacher passes), distance %s, %d steps (global batch %d), %d process(es)",
            sum(p.numel() for p in student.parameters()) / 1e6,
            len(train_clips),
            len(train_idx),
            dcfg.N,
            dcfg.n_max,
            expected_teacher_passes(dcfg.n_max),
            dcfg.distance,
            end_step,
            dcfg.batch_size,
            env.world,
        )

        def step(k: int, idx: np.ndarray) -> dict[str, Any]:
            d = draw(dcfg, model_cfg.edm, dcfg.batch_size, c, T, step_generator(dcfg.seed, k)).local(env)
            x0 = normalise(torch.from_numpy(np.asarray(latents[idx], dtype=np.float32)), mu, std)
            rows = cap_rows[torch.from_numpy(idx)]
            rows = torch.where(d.drop, torch.zeros_like(rows), rows)  # METHOD §3.1: caption -> "" (row 0)
            cond = table.cond(rows).to(dev)
            uncond = table.cond(torch.zeros_like(rows)).to(dev)
            d = d.to(dev)
            timer = PartTimer(dcfg.time_parts, cuda=dev.startswith("cuda"))
            t0 = time.perf_counter()
            metrics = iteration(lossmod, student, teacher_net, ema, opt, x0.to(dev), cond, uncond, d, grid, timer)
            metrics["iteration_s"] = time.perf_counter() - t0
            metrics.update({f"time_{p}": v for p, v in timer.seconds.items()})
            return metrics

        run_stage(env, rd, Stage("distill", dcfg, state, step), ckpt, train_idx, end_step)
        if env.is_main:
            final = copy.deepcopy(ema.model).cpu().eval()
            out = ModelSource(
                student_model_config(model_cfg, dcfg),
                final,
                src.codec,
                src.text,
                mu,
                std,
                {**provenance, "steps": end_step},
            )
            path = save_model_checkpoint(rd.final / STUDENT_CHECKPOINT, out, dtype=torch.float16)
            logger.info("wrote the export checkpoint %s", path)
            if dcfg.sample_steps:
                write_student_samples(out, ds, dcfg, rd.samples / f"student_{end_step:07d}")
        return rd.path


@torch.no_grad()
def write_student_samples(src: ModelSource, ds: ClipDataset, dcfg: DistillConfig, out: Path) -> Path:
    """γ = 0 samples of the sample prompts (conditioning.sample_prompts) at each of dcfg.sample_steps (same
    noise), as WAVs."""
    import soundfile as sf

    from .edm import sampling_sigmas
    from .sampling import guided_jump, sample_gamma

    cfg = src.config
    prompts = sample_prompts(ds, dcfg.sample_prompts)
    uncond = encode_prompts(src.text, [""], cfg.text.max_length)
    g = torch.Generator().manual_seed(dcfg.sample_seed)
    eps_T = torch.randn(len(prompts), cfg.latent_channels, cfg.dit.latent_frames, generator=g)
    out.mkdir(parents=True, exist_ok=True)
    for steps in dcfg.sample_steps:
        sig = sampling_sigmas(steps, cfg.edm)
        for j, p in enumerate(prompts):
            cond = encode_prompts(src.text, [p], cfg.text.max_length)
            jump = guided_jump(src.student, cond, uncond, cfg.edm.default_omega, cfg.edm.default_nu)
            x0 = sample_gamma(jump, sig[0] * eps_T[j : j + 1], sig, 0.0, [], cfg.edm.sigma_min)
            wav = src.decode(x0)[0].numpy()
            sf.write(out / f"{j}_steps{steps}.wav", wav, ds.sample_rate)
    (out / "prompts.json").write_text(json.dumps(prompts, indent=1))
    return out


# ------------------------------------------------------------------------------------------- cost probe


def measure_iteration(
    model_cfg: ModelConfig,
    dcfg: DistillConfig,
    batch: int,
    n_values: list[int],
    repeats: int = 2,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Seconds per part of one iteration at a config's sizes, random weights, for each forced n.

    The networks are random (zero-initialised layers perturbed, so every pass computes something); the
    time of a pass does not depend on the weights. Per n: the median over `repeats` iterations after one
    warm-up iteration. Returns one record per n with time_<part> and iteration_s.
    """
    torch.manual_seed(seed)
    text, teacher, _ = build_networks(model_cfg)
    perturb_zero_init(teacher, seed)
    teacher.requires_grad_(False).eval()
    student = student_from_teacher(teacher)
    ema = EMA(student, dcfg.ema_decay)
    opt = torch.optim.RAdam(student.parameters(), lr=dcfg.lr, betas=dcfg.betas)
    lossmod = CTMLoss(student, teacher, dcfg.distance, dcfg.lambda_dsm)
    c, T = model_cfg.latent_channels, model_cfg.dit.latent_frames
    grid = grid_sigmas(dcfg.N, model_cfg.edm)
    prompts = ["a dog barking", "Roland TR-808 snare drum", ""]
    cond_all = encode_prompts(text, [prompts[i % 3] for i in range(batch)], model_cfg.text.max_length)
    uncond = encode_prompts(text, [""] * batch, model_cfg.text.max_length)
    records = []
    for n in n_values:
        if not 1 <= n <= dcfg.N - 1:
            raise ValueError(f"n = {n} outside [1, N-1]")
        runs = []
        for r in range(repeats + 1):
            gen = torch.Generator().manual_seed(1000 * n + r)
            d = draw(dcfg, model_cfg.edm, batch, c, T, gen)
            i_t, i_s = sample_grid_indices(n, dcfg.N, batch, gen)
            d = dataclasses.replace(d, n=n, i_t=i_t, i_s=i_s)
            x0 = 0.5 * torch.randn(batch, c, T, generator=gen)
            timer = PartTimer(True)
            t0 = time.perf_counter()
            iteration(lossmod, student, teacher, ema, opt, x0, cond_all, uncond, d, grid, timer)
            if r:  # the first is warm-up
                runs.append({"iteration_s": time.perf_counter() - t0, **timer.seconds})
        rec: dict[str, Any] = {"n": n, "batch": batch, "threads": torch.get_num_threads()}
        for key in runs[0]:
            rec[key if key == "iteration_s" else f"time_{key}"] = float(np.median([x[key] for x in runs]))
        records.append(rec)
    return records
