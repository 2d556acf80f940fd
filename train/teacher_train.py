"""Stage 2: train the EDM teacher D_φ (METHOD §1) over the normalised latent (METHOD §5, §5b).

The latent is the config's (train.latent): the fixed log-mel code, or the latents of a finished VAE run (--vae).
Per step: x0 = 0.5·(z − μ_c)/std_c of the cached latents; ln σ ~ N(−1.2, 1.2²); captions replaced by "" with
probability `caption_dropout` (0.1, METHOD §3.1's rate, which the CFG of §3.5 needs); loss
mean(w(σ)·(D(x0 + σ·ε, σ, c) − x0)²) with w(σ) = (σ² + σ_d²)/(σ·σ_d)² (losses.edm_loss). EMA of the weights
(μ = ema_decay) is what samples and the final files use. Text: the frozen TextEncoder encodes every distinct
caption of the dataset once at start (an in-memory table; "" is row 0).

Samples (rank 0, every `sample_every` steps and at the end): Heun (train.sampling.sample_heun) on the Karras
grid of `sample_steps` points with the CFG denoiser (sampling.cfg_denoiser, ω = sample_omega), decoded by
the codec, for captions of the *test* split: WAVs and a spectrogram PNG under samples/teacher_<step>/.
Without test clips the prompts (unless configured) and the reference clips come from the training split, and
without validation clips no valid_loss is logged; the run says so once when it starts.

Final files: final/teacher_ema.safetensors (+ _fp16) — the DiT's EMA weights with the model config in the
metadata — and final/teacher_model.safetensors, the train.checkpoint format (teacher in the student slot, with
the codec and the latent statistics, fp32), which distillation and export can load with load_model_checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import TEACHER_CHECKPOINT, ModelSource, save_model_checkpoint
from .conditioning import CaptionTable, encode_prompts, sample_prompts, sample_split
from .data import ClipDataset, balanced_items, check_splits, clip_labels
from .edm import karras_sigmas
from .latent import Codec, decode_latent, normalise, resolve_latent
from .loop import EMA, RunDir, save_safetensors, shard, step_generator, wrap_ddp
from .losses import edm_loss, sample_log_normal_sigma
from .models.config import ModelConfig, load_model_config
from .models.denoiser import Conditioning, CTMDenoiser
from .models.dit import DiT
from .models.text import TextEncoder
from .sampling import cfg_denoiser, sample_heun
from .stage import AdamWStageConfig, Stage, TrainState, distributed_job, run_stage, stage_table

logger = logging.getLogger(__name__)

SAMPLES_FROM_TRAIN = "the samples' prompts (unless configured) and reference clips come from the training split"


@dataclass(frozen=True)
class TeacherTrainConfig(AdamWStageConfig):
    """The [teacher_train] table."""

    steps: int = 3000
    batch_size: int = 32  # global batch of clips
    ema_decay: float = 0.999
    caption_dropout: float = 0.1  # METHOD §3.1
    class_balance: float = 0.0  # repeat-factor power per clip label (data.class_repeat_factors); 0: plain epochs
    sample_every: int = 1000
    sample_prompts: tuple[str, ...] = ()  # empty: 8 captions of the test split (of train, without test clips)
    sample_steps: int = 40  # Karras grid points of the Heun sampler (METHOD §1: N = 40)
    sample_omega: float = 3.0  # CFG scale of the samples
    sample_seed: int = 1234

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("[teacher_train] steps and batch_size must be >= 1")
        if not 0.0 <= self.caption_dropout < 1.0 or not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("[teacher_train] caption_dropout and ema_decay must be in [0, 1)")
        if self.sample_steps < 2:
            raise ValueError("[teacher_train] sample_steps must be >= 2")
        if self.class_balance < 0:
            raise ValueError("[teacher_train] class_balance must be >= 0")


def resolve(
    config: str | Path, data: str | Path, vae: str | Path | None, **overrides: Any
) -> tuple[ModelConfig, TeacherTrainConfig, dict]:
    """Model config, stage config (with CLI overrides) and the resolved dictionary saved in the run dir."""
    model_cfg = load_model_config(config)
    tcfg = stage_table(config, TeacherTrainConfig, "teacher_train", **overrides)
    resolved = {
        "stage": "teacher",
        "config_source": str(config),
        "data": str(Path(data).resolve()),
        "vae_run": str(Path(vae).resolve()) if vae is not None else None,
        "model": model_cfg.to_dict(),
        "teacher_train": dataclasses.asdict(tcfg),
    }
    return model_cfg, tcfg, resolved


class TeacherLoss(nn.Module):
    """The EDM objective as a module, so DistributedDataParallel sees the whole forward pass."""

    def __init__(self, denoiser: CTMDenoiser) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x0: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """x0, eps [B, C, T]; sigma [B] -> scalar loss (METHOD §1, §3.8 weighting)."""
        return edm_loss(lambda x, s: self.denoiser.D(x, s, cond), x0, sigma, eps, self.denoiser.sigma_data)


def train_teacher(
    config: str | Path,
    data: str | Path,
    vae: str | Path | None,
    run: str | Path,
    max_steps: int | None = None,
    resume: bool = False,
    threads: int | None = None,
    init_from: str | Path | None = None,
    **overrides: Any,
) -> Path:
    """Train (or resume) a teacher run over the config's latent (`vae`: a finished VAE run, for latent = "vae").

    `init_from`: a teacher model checkpoint (e.g. the fp16 one kept in models/) whose network starts both the
    weights and their EMA of a new run, so training can go on where a finished run's directory is gone (the
    optimiser state starts afresh, under the run's own warm-up). Its architecture and latent statistics must be
    this run's.
    """
    with distributed_job(threads) as env:
        model_cfg, tcfg, resolved = resolve(config, data, vae, **overrides)
        ds = ClipDataset(data)
        ds.check_matches(model_cfg.sample_rate, model_cfg.dit.latent_frames * model_cfg.latent_hop)
        check_splits(
            ds, "train teacher", {"valid": "no valid_loss", "test": SAMPLES_FROM_TRAIN}, batch_size=tcfg.batch_size
        )
        codec, latents, mu, std, provenance = resolve_latent(model_cfg, ds, vae, env)
        init = None
        if init_from is not None:
            init, mu, std = _initial_weights(init_from, model_cfg, mu, std)
            resolved["init_from"] = str(Path(init_from).resolve())
            provenance = {**provenance, "init_from": resolved["init_from"]}
        rd = RunDir(run, env)
        ckpt = rd.start(resolved, resume)
        end_step = max_steps or tcfg.steps

        text = TextEncoder(model_cfg.text)
        table = CaptionTable(text, ds.captions, model_cfg.text.max_length)
        torch.manual_seed(tcfg.seed)  # identical initial weights on every rank
        denoiser = CTMDenoiser(
            DiT(model_cfg.dit, model_cfg.latent_channels, text.hidden_size), model_cfg.edm.sigma_data
        ).to(env.device)
        ema = EMA(denoiser, tcfg.ema_decay)
        state = TrainState({"model": denoiser, "ema": ema}, tcfg.optimizer(denoiser.parameters()))
        if ckpt is None and init is not None:  # a new run started from a checkpoint's weights
            denoiser.load_state_dict(init)
            ema.load_state_dict(init)
        lossmod = wrap_ddp(TeacherLoss(denoiser), env)
        dev = env.device
        train_clips = ds.indices("train")
        train_idx = balanced_items(clip_labels(ds), train_clips, tcfg.class_balance)
        has_valid = len(ds.indices("valid")) > 0
        cap_rows = table.rows(ds.captions)
        c, T = model_cfg.latent_channels, model_cfg.dit.latent_frames
        logger.info(
            "teacher %s params, %d training clips (%d per epoch, class balance %g), %d captions, %d steps "
            "(global batch %d), %d process(es)",
            f"{sum(p.numel() for p in denoiser.parameters()) / 1e6:.2f} M",
            len(train_clips),
            len(train_idx),
            tcfg.class_balance,
            len(table.names) - 1,
            end_step,
            tcfg.batch_size,
            env.world,
        )

        def step(k: int, idx: np.ndarray) -> dict[str, Any]:
            gen = step_generator(tcfg.seed, k)
            drop = shard(torch.rand(tcfg.batch_size, generator=gen) < tcfg.caption_dropout, env)
            sigma = shard(sample_log_normal_sigma(tcfg.batch_size, gen, model_cfg.edm.p_mean, model_cfg.edm.p_std), env)
            eps = shard(torch.randn(tcfg.batch_size, c, T, generator=gen), env)
            x0 = normalise(torch.from_numpy(np.asarray(latents[idx], dtype=np.float32)), mu, std)
            rows = cap_rows[torch.from_numpy(idx)]
            rows = torch.where(drop, torch.zeros_like(rows), rows)  # caption dropout to "" (row 0)
            loss = lossmod(x0.to(dev), sigma.to(dev), eps.to(dev), table.cond(rows).to(dev))
            gnorm = tcfg.optimizer_step(state.opt, loss, denoiser.parameters(), k)
            ema.update(denoiser)
            return {"loss": loss, "grad_norm": gnorm}

        def evaluate(k: int) -> None:
            ema_cpu = copy.deepcopy(ema.model).cpu()
            if has_valid:
                rd.log({"step": k, "valid_loss": valid_loss(ema_cpu, latents, ds, table, mu, std, tcfg.sample_seed)})
            write_samples(ema_cpu, text, codec, mu, std, ds, model_cfg, tcfg, rd.samples / f"teacher_{k:07d}")

        stage = Stage(
            "teacher", tcfg, state, step, evaluate=evaluate, evaluate_every=tcfg.sample_every, evaluate_at_end=True
        )
        run_stage(env, rd, stage, ckpt, train_idx, end_step)
        if env.is_main:
            _save_final(rd, copy.deepcopy(ema.model).cpu(), model_cfg, tcfg, codec, text, mu, std, end_step, provenance)
        return rd.path


def _save_final(
    rd: RunDir,
    final: CTMDenoiser,
    model_cfg: ModelConfig,
    tcfg: TeacherTrainConfig,
    codec: Codec,
    text: TextEncoder,
    mu: torch.Tensor,
    std: torch.Tensor,
    end_step: int,
    provenance: dict[str, Any],
) -> None:
    """final/teacher_ema(_fp16).safetensors (the DiT) and final/teacher_model.safetensors (train.checkpoint)."""
    meta = {"format": "soundctm-rt-teacher/1", "config": model_cfg.to_dict(), "step": end_step, **provenance}
    save_safetensors(rd.final / "teacher_ema.safetensors", final.net.state_dict(), meta)
    save_safetensors(rd.final / "teacher_ema_fp16.safetensors", final.net.state_dict(), meta, dtype=torch.float16)
    src = ModelSource(
        model_cfg,
        final,
        codec,
        text,
        mu,
        std,
        {"stage": "teacher", "steps": end_step, "ema_decay": tcfg.ema_decay, **provenance},
    )
    save_model_checkpoint(rd.final / TEACHER_CHECKPOINT, src, dtype=torch.float32)


def _initial_weights(
    path: str | Path, model_cfg: ModelConfig, mu: torch.Tensor, std: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The CTMDenoiser state of a teacher checkpoint and the latent statistics the run goes on with, refused
    unless it fits this run (architecture, latent code and statistics: another normalisation would make the
    weights mean something else).

    The checkpoint's own statistics are kept: a dataset prepared again on another machine (another resampler
    build, another FFT) gives statistics a few hundredths of a nat away, which must not shift the code under
    weights trained on the old one. Beyond 0.05 nat (0.4 dB) in a mean or 2 % in a std it is another dataset."""
    from .checkpoint import load_model_checkpoint

    src = load_model_checkpoint(path)
    c = src.config
    same = c.latent == model_cfg.latent and c.dit == model_cfg.dit and c.text == model_cfg.text
    same = same and (
        c.mel.code_fields() == model_cfg.mel.code_fields() if c.latent == "mel" else c.vae == model_cfg.vae
    )
    if not same:
        raise ValueError(f"--init-from {path}: its architecture or latent differs from the config's")
    d_mu = float((src.latent_mean.float() - mu).abs().max())
    d_std = float(((src.latent_std.float() - std) / std).abs().max())
    if d_mu > 0.05 or d_std > 0.02:
        raise ValueError(
            f"--init-from {path}: its latent statistics differ from this dataset's "
            f"(max |Δμ| {d_mu:.3g}, max |Δstd|/std {d_std:.3g}): another dataset"
        )
    logger.info("--init-from: keeping the checkpoint's statistics (max |Δμ| %.3g, |Δstd|/std %.3g)", d_mu, d_std)
    return {k: v.float() for k, v in src.student.state_dict().items()}, src.latent_mean.float(), src.latent_std.float()


@torch.no_grad()
def valid_loss(
    denoiser: CTMDenoiser,
    latents: np.ndarray,
    ds: ClipDataset,
    table: CaptionTable,
    mu: torch.Tensor,
    std: torch.Tensor,
    seed: int,
    n: int = 128,
) -> float:
    """EDM loss of a denoiser on up to n validation clips, fixed σ and noise from EDM's N(−1.2, 1.2²) whatever the
    config's p_mean (comparable across steps, runs and configs)."""
    idx = ds.require("valid", "valid_loss")[:n]
    g = torch.Generator().manual_seed(seed)
    x0 = normalise(torch.from_numpy(np.asarray(latents[idx], dtype=np.float32)), mu, std)
    sigma = sample_log_normal_sigma(len(idx), g)
    eps = torch.randn(x0.shape, generator=g)
    cond = table.cond(table.rows([ds.captions[int(i)] for i in idx]))
    return float(edm_loss(lambda x, s: denoiser.D(x, s, cond), x0, sigma, eps, denoiser.sigma_data))


@torch.no_grad()
def generate(
    denoiser: CTMDenoiser,
    text: TextEncoder,
    codec: Codec,
    mu: torch.Tensor,
    std: torch.Tensor,
    prompts: list[str],
    model_cfg: ModelConfig,
    steps: int,
    omega: float,
    seed: int,
) -> torch.Tensor:
    """Teacher samples: Heun + CFG over `steps` Karras points from x_T = σ_max·ε, decoded -> [P, N] audio."""
    e = model_cfg.edm
    cond = encode_prompts(text, prompts, model_cfg.text.max_length)
    uncond = encode_prompts(text, [""], model_cfg.text.max_length)
    g = torch.Generator().manual_seed(seed)
    x_T = e.sigma_max * torch.randn(len(prompts), model_cfg.latent_channels, model_cfg.dit.latent_frames, generator=g)
    sigmas = karras_sigmas(steps, e.sigma_min, e.sigma_max, e.rho)
    x0 = sample_heun(cfg_denoiser(denoiser, cond, uncond, omega), x_T, sigmas)
    return decode_latent(codec, x0, mu, std)


def write_samples(
    denoiser: CTMDenoiser,
    text: TextEncoder,
    codec: Codec,
    mu: torch.Tensor,
    std: torch.Tensor,
    ds: ClipDataset,
    model_cfg: ModelConfig,
    tcfg: TeacherTrainConfig,
    out: Path,
) -> Path:
    """WAVs and a spectrogram PNG of teacher samples for the sample prompts."""
    import soundfile as sf

    from .report import save_spectrograms

    prompts = sample_prompts(ds, tcfg.sample_prompts)
    wav = generate(
        denoiser,
        text,
        codec,
        mu,
        std,
        prompts,
        model_cfg,
        tcfg.sample_steps,
        tcfg.sample_omega,
        tcfg.sample_seed,
    ).numpy()
    out.mkdir(parents=True, exist_ok=True)
    for j, w in enumerate(wav):
        sf.write(out / f"{j}.wav", w, ds.sample_rate)
    # beside each sample, a real held-out clip with the same caption (silence when the prompt is not one)
    split = sample_split(ds)
    ref_idx = ds.indices(split)
    refs = []
    for p in prompts:
        match = [int(i) for i in ref_idx if ds.captions[int(i)] == p]
        refs.append(ds.wave(match[:1])[0] if match else np.zeros(wav.shape[-1], dtype=np.float32))
    save_spectrograms(
        [[w, r] for w, r in zip(wav, refs, strict=True)],
        prompts,
        [f"teacher Heun {tcfg.sample_steps}, ω={tcfg.sample_omega}", f"real {split} clip"],
        out / "spectrograms.png",
        ds.sample_rate,
    )
    (out / "prompts.json").write_text(json.dumps(prompts, indent=1))
    return out
