"""Stage 1: train the 44.1 kHz STFT-domain VAE (METHOD §5) and compute its latent normalisation statistics.

Loss = stft_weight·MR-STFT + mel_weight·multi-scale log-mel L1 + kl_weight·KL (Gaussian bottleneck,
reparameterised z = μ + σ·ε). No adversarial loss: on 2 CPU cores a discriminator would about double the cost
of a step, and the budget buys more by training the reconstruction losses longer; with the GPU config it
remains an open option (documented, not implemented).

After training (rank 0): final/vae.safetensors (fp32) and final/vae_fp16.safetensors, then train.vae_run's
finalisation: the posterior means of every clip of the dataset cached once (data.cache_latents); per-channel
statistics μ_c, std_c over the *training* clips' latent frames in final/latent_stats.safetensors (METHOD §5:
z' = 0.5·(z − μ_c)/std_c); report/test_metrics.json + test_spectrograms.png (report.reconstruction_report).
Without validation clips there are no validation reconstructions, without test clips no report: the run says
so once when it starts.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .data import ClipDataset, check_splits
from .loop import EMA, RunDir, shard, step_generator, wrap_ddp
from .losses import gaussian_kl, mel_l1, mr_stft_loss
from .models.config import ModelConfig, load_model_config
from .models.vae import VAE
from .stage import AdamWStageConfig, Stage, TrainState, distributed_job, run_stage, stage_table
from .vae_run import REPORT_SKIPPED, VALIDATION_SKIPPED, finalize_vae, save_vae, validate_reconstructions

# the readers of what this stage writes, importable beside it
from .vae_run import load_latent_stats as load_latent_stats
from .vae_run import load_vae_run as load_vae_run

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VAETrainConfig(AdamWStageConfig):
    """The [vae_train] table."""

    steps: int = 4000  # optimiser steps (the lr schedule's length)
    batch_size: int = 16  # global batch of crops
    lr: float = 5e-4
    betas: tuple[float, float] = (0.8, 0.99)
    weight_decay: float = 0.01
    segment_frames: int = 32  # crop length in latent frames (x latent_hop samples)
    stft_weight: float = 1.0
    mel_weight: float = 1.0
    kl_weight: float = 1e-4  # small: the latent stays informative; METHOD §5 normalises its scale afterwards
    ema_decay: float = 0.0  # 0 disables the EMA
    sample_every: int = 1000  # validation reconstructions (metrics + WAVs)
    eval_clips: int = 8

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.segment_frames < 1:
            raise ValueError("[vae_train] steps, batch_size and segment_frames must be >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("[vae_train] ema_decay must be in [0, 1)")


def resolve(config: str | Path, data: str | Path, **overrides: Any) -> tuple[ModelConfig, VAETrainConfig, dict]:
    """Model config, stage config (with CLI overrides) and the resolved dictionary saved in the run dir."""
    model_cfg = load_model_config(config)
    tcfg = stage_table(config, VAETrainConfig, "vae_train", **overrides)
    resolved = {
        "stage": "vae",
        "config_source": str(config),
        "data": str(Path(data).resolve()),
        "model": model_cfg.to_dict(),
        "vae_train": dataclasses.asdict(tcfg),
    }
    return model_cfg, tcfg, resolved


class VAELoss(nn.Module):
    """The training objective as a module, so DistributedDataParallel sees the whole forward pass."""

    def __init__(self, vae: VAE, tcfg: VAETrainConfig) -> None:
        super().__init__()
        self.vae = vae
        self.tcfg = tcfg

    def forward(self, wav: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """wav [B, N], eps [B, C, N / latent_hop] unit noise for the reparameterisation -> (loss, parts)."""
        mean, logvar = self.vae.encode(wav)
        z = mean + torch.exp(0.5 * logvar) * eps
        y = self.vae.decode(z)
        sr = self.vae.cfg.sample_rate
        parts = {"stft": mr_stft_loss(y, wav), "mel": mel_l1(y, wav, sr), "kl": gaussian_kl(mean, logvar)}
        t = self.tcfg
        loss = t.stft_weight * parts["stft"] + t.mel_weight * parts["mel"] + t.kl_weight * parts["kl"]
        return loss, parts


def crop_batch(ds: ClipDataset, idx: np.ndarray, u: torch.Tensor, seg: int) -> torch.Tensor:
    """Crops [B, seg] of clips idx at offsets u·(room + 1), room = max(0, min(n_valid, clip) − seg)."""
    wav = ds.wave(idx)
    out = np.zeros((len(idx), seg), dtype=np.float32)
    for j, i in enumerate(idx):
        room = max(0, min(int(ds.n_valid[i]), ds.clip_samples) - seg)
        off = min(room, int(float(u[j]) * (room + 1)))
        piece = wav[j, off : off + seg]
        out[j, : piece.size] = piece
    return torch.from_numpy(out)


def train_vae(
    config: str | Path,
    data: str | Path,
    run: str | Path,
    max_steps: int | None = None,
    resume: bool = False,
    threads: int | None = None,
    finalize: bool = True,
    **overrides: Any,
) -> Path:
    """Train (or resume) a VAE run; returns the run directory. Works under torchrun (see loop's docstring)."""
    with distributed_job(threads) as env:
        model_cfg, tcfg, resolved = resolve(config, data, **overrides)
        ds = ClipDataset(data)
        ds.check_matches(model_cfg.vae.sample_rate, model_cfg.dit.latent_frames * model_cfg.vae.latent_hop)
        skipped = {"valid": VALIDATION_SKIPPED, **({"test": REPORT_SKIPPED} if finalize else {})}
        check_splits(ds, "train vae", skipped, batch_size=tcfg.batch_size)
        rd = RunDir(run, env)
        ckpt = rd.start(resolved, resume)
        end_step = max_steps or tcfg.steps

        torch.manual_seed(tcfg.seed)  # identical initial weights on every rank
        vae = VAE(model_cfg.vae).to(env.device)
        ema = EMA(vae, tcfg.ema_decay) if tcfg.ema_decay > 0 else None
        state = TrainState({"model": vae, "ema": ema}, tcfg.optimizer(vae.parameters()))
        lossmod = wrap_ddp(VAELoss(vae, tcfg), env)
        seg = tcfg.segment_frames * model_cfg.vae.latent_hop
        c = model_cfg.vae.latent_channels
        train_idx = ds.indices("train")
        logger.info(
            "VAE %s params, %d training clips, %d steps (global batch %d, %.2f s crops), %d process(es)",
            f"{sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M",
            len(train_idx),
            end_step,
            tcfg.batch_size,
            seg / ds.sample_rate,
            env.world,
        )

        def step(k: int, idx: np.ndarray) -> dict[str, Any]:
            gen = step_generator(tcfg.seed, k)
            u = shard(torch.rand(tcfg.batch_size, generator=gen), env)
            eps = shard(torch.randn(tcfg.batch_size, c, tcfg.segment_frames, generator=gen), env)
            wav = crop_batch(ds, idx, u, seg).to(env.device)
            loss, parts = lossmod(wav, eps.to(env.device))
            gnorm = tcfg.optimizer_step(state.opt, loss, vae.parameters(), k)
            if ema is not None:
                ema.update(vae)
            return {"loss": loss, **parts, "grad_norm": gnorm}

        def evaluate(k: int) -> None:
            validate_reconstructions(_weights(vae, ema), ds, rd, k, tcfg.eval_clips)

        stage = Stage("vae", tcfg, state, step, ("audio_s_per_s", seg / ds.sample_rate), evaluate, tcfg.sample_every)
        run_stage(env, rd, stage, ckpt, train_idx, end_step)
        if env.is_main:
            meta = {"format": "soundctm-rt-vae/1", "config": model_cfg.to_dict(), "step": end_step}
            save_vae(rd, _weights(vae, ema), meta)
        if finalize and env.is_main and (max_steps is None or max_steps >= tcfg.steps):
            finalize_vae(rd.path, ds)
        return rd.path


def _weights(vae: VAE, ema: EMA | None) -> VAE:
    """A CPU copy of the weights that validation and the final files use: the EMA's, when there is one."""
    return copy.deepcopy(ema.model if ema is not None else vae).cpu()
