"""Stage 1b: fine-tune only the decoder of a finished VAE run, on its cached latents (METHOD §5).

The encoder is frozen and copied unchanged, so the posterior means — and with them the latent cache, the
per-channel statistics μ_c, std_c and every teacher or student trained on them — stay valid: the fine-tuned
VAE can replace the old one in a model checkpoint (`train swap-vae`) without retraining anything downstream.
Without the encoder a step costs the decoder's forward and backward pass alone, so the same CPU hour buys
several times the decoder steps of `train vae`.

Crops are taken with the decoder's receptive field: a window of segment_frames latent frames plus R =
decoder_context frames on each side (the clip's edges replicated, as VAE.decode does), run through the
decoder core, gives exactly the audio of the central frames — what streaming decode computes at run time.

The run directory has the layout of a `train vae` run (final/vae.safetensors, latent statistics, report), so
every command that takes a VAE run takes this one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .data import ClipDataset, check_splits, latent_cache_dir
from .latent import latent_statistics
from .loop import RunDir, shard, step_generator, wrap_ddp
from .losses import mel_l1, mr_stft_loss
from .models.vae import VAE, pad_context
from .stage import AdamWStageConfig, Stage, TrainState, distributed_job, run_stage, stage_table
from .vae_run import (
    REPORT_SKIPPED,
    VALIDATION_SKIPPED,
    finalize_vae,
    load_vae_run,
    save_vae,
    validate_reconstructions,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VAEDecoderTrainConfig(AdamWStageConfig):
    """The [vae_decoder_train] table."""

    steps: int = 6000  # optimiser steps (the lr schedule's length)
    batch_size: int = 16  # global batch of crops
    lr: float = 2e-4  # lower than `train vae`: it starts from a trained decoder
    warmup: int = 100
    betas: tuple[float, float] = (0.8, 0.99)
    weight_decay: float = 0.01
    segment_frames: int = 32  # crop length in latent frames (x latent_hop samples), context excluded
    stft_weight: float = 1.0
    mel_weight: float = 1.0
    # Gaussian noise added to the normalised latent z' (METHOD §5 units, std 0.5 = the data's spread): a
    # decoder that sees only exact posterior means may be brittle on a student's slightly-off latents.
    latent_noise: float = 0.0
    sample_every: int = 1000
    eval_clips: int = 8

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.segment_frames < 1:
            raise ValueError("[vae_decoder_train] steps, batch_size and segment_frames must be >= 1")
        if self.latent_noise < 0:
            raise ValueError("[vae_decoder_train] latent_noise must be >= 0")


def resolve(
    config: str | Path, data: str | Path, vae: str | Path, **overrides: Any
) -> tuple[VAEDecoderTrainConfig, dict]:
    """Stage config (with CLI overrides) and the resolved dictionary saved in the run dir."""
    tcfg = stage_table(config, VAEDecoderTrainConfig, "vae_decoder_train", **overrides)
    resolved = {
        "stage": "vae-decoder",
        "config_source": str(config),
        "data": str(Path(data).resolve()),
        "vae_run": str(Path(vae).resolve()),
        "vae_decoder_train": dataclasses.asdict(tcfg),
    }
    return tcfg, resolved


class DecoderLoss(nn.Module):
    """Reconstruction loss of the decoder core alone (DDP sees the whole forward pass)."""

    def __init__(self, vae: VAE, tcfg: VAEDecoderTrainConfig) -> None:
        super().__init__()
        self.decoder = vae.decoder
        self.sample_rate = vae.cfg.sample_rate
        self.tcfg = tcfg

    def forward(self, z_window: torch.Tensor, wav: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """z_window [B, C, W + 2R] raw latents, wav [B, W·latent_hop] -> (loss, parts)."""
        y = self.decoder(z_window)
        parts = {"stft": mr_stft_loss(y, wav), "mel": mel_l1(y, wav, self.sample_rate)}
        loss = self.tcfg.stft_weight * parts["stft"] + self.tcfg.mel_weight * parts["mel"]
        return loss, parts


def crop_windows(
    latents: np.ndarray,
    ds: ClipDataset,
    idx: np.ndarray,
    u: torch.Tensor,
    seg_frames: int,
    r: int,
    hop: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent windows [B, C, seg + 2r] (clip edges replicated) and the audio of their central frames [B, seg·hop].

    The crop start is drawn over the clip's frames that hold audio (n_valid), like `train vae`'s crops.
    """
    lat = torch.from_numpy(np.asarray(latents[idx], dtype=np.float32))  # [B, C, T]
    t = lat.shape[-1]
    padded = pad_context(lat, r)  # [B, C, T + 2r]
    wav = ds.wave(idx)
    zs = torch.empty(len(idx), lat.shape[1], seg_frames + 2 * r)
    out = np.zeros((len(idx), seg_frames * hop), dtype=np.float32)
    for j, i in enumerate(idx):
        valid_frames = -(-min(int(ds.n_valid[i]), ds.clip_samples) // hop)
        room = max(0, min(valid_frames, t) - seg_frames)
        k = min(room, int(float(u[j]) * (room + 1)))
        zs[j] = padded[j, :, k : k + seg_frames + 2 * r]
        piece = wav[j, k * hop : (k + seg_frames) * hop]
        out[j, : piece.size] = piece
    return zs, torch.from_numpy(out)


def train_vae_decoder(
    config: str | Path,
    data: str | Path,
    vae: str | Path,
    run: str | Path,
    max_steps: int | None = None,
    resume: bool = False,
    threads: int | None = None,
    finalize: bool = True,
    **overrides: Any,
) -> Path:
    """Fine-tune (or resume fine-tuning) the decoder of the VAE run `vae`; returns the run directory."""
    with distributed_job(threads) as env:
        tcfg, resolved = resolve(config, data, vae, **overrides)
        parent, model_cfg, parent_id = load_vae_run(vae)
        ds = ClipDataset(data)
        ds.check_matches(model_cfg.vae.sample_rate, model_cfg.dit.latent_frames * model_cfg.vae.latent_hop)
        skipped = {"valid": VALIDATION_SKIPPED, **({"test": REPORT_SKIPPED} if finalize else {})}
        check_splits(ds, "train vae-decoder", skipped, batch_size=tcfg.batch_size)
        cache = latent_cache_dir(ds.root, parent_id) / "latents.npy"
        if not cache.is_file():
            raise FileNotFoundError(
                f"{cache} not found: cache the parent VAE's latents first (`train vae-finalize --run {vae}`)"
            )
        resolved["parent_vae_id"] = parent_id
        latents = np.load(cache, mmap_mode="r")
        rd = RunDir(run, env)
        ckpt = rd.start(resolved, resume)
        end_step = max_steps or tcfg.steps

        model = parent.to(env.device)
        for p in model.encoder.parameters():
            p.requires_grad_(False)
        state = TrainState({"decoder": model.decoder}, tcfg.optimizer(model.decoder.parameters()))
        lossmod = wrap_ddp(DecoderLoss(model, tcfg), env)
        vcfg = model_cfg.vae
        r, c = vcfg.decoder_context, vcfg.latent_channels
        train_idx = ds.indices("train")
        seg_samples = tcfg.segment_frames * vcfg.latent_hop
        # latent noise is drawn in normalised units and scaled back by the training latents' std_c (METHOD §5)
        std_c = latent_statistics(latents, train_idx)[1].to(env.device)
        logger.info(
            "VAE decoder fine-tune: %.2f M trainable params, %d training clips, %d steps (global batch %d, "
            "%.2f s crops)",
            sum(p.numel() for p in model.decoder.parameters()) / 1e6,
            len(train_idx),
            end_step,
            tcfg.batch_size,
            seg_samples / ds.sample_rate,
        )

        def step(k: int, idx: np.ndarray) -> dict[str, Any]:
            gen = step_generator(tcfg.seed, k)
            u = shard(torch.rand(tcfg.batch_size, generator=gen), env)
            noise = shard(torch.randn(tcfg.batch_size, c, tcfg.segment_frames + 2 * r, generator=gen), env)
            z, wav = crop_windows(latents, ds, idx, u, tcfg.segment_frames, r, vcfg.latent_hop)
            z = z.to(env.device)
            if tcfg.latent_noise > 0:  # z' = 0.5·(z − μ)/std  =>  δz = 2·std·δz'
                z = z + 2.0 * std_c[None, :, None] * tcfg.latent_noise * noise.to(env.device)
            loss, parts = lossmod(z, wav.to(env.device))
            gnorm = tcfg.optimizer_step(state.opt, loss, model.decoder.parameters(), k)
            return {"loss": loss, **parts, "grad_norm": gnorm}

        def evaluate(k: int) -> None:
            validate_reconstructions(copy.deepcopy(model).cpu(), ds, rd, k, tcfg.eval_clips)

        throughput = ("audio_s_per_s", seg_samples / ds.sample_rate)
        stage = Stage("vae-decoder", tcfg, state, step, throughput, evaluate, tcfg.sample_every)
        run_stage(env, rd, stage, ckpt, train_idx, end_step)
        if env.is_main:
            meta = {
                "format": "soundctm-rt-vae/1",
                "config": model_cfg.to_dict(),
                "step": end_step,
                "parent_vae_id": parent_id,
            }
            save_vae(rd, copy.deepcopy(model).cpu(), meta)
        if finalize and env.is_main and (max_steps is None or max_steps >= tcfg.steps):
            finalize_decoder_run(rd.path, Path(vae), ds)
        return rd.path


def finalize_decoder_run(run: Path, parent: Path, ds: ClipDataset, report: bool = True) -> dict[str, Any]:
    """Share the parent's latent cache and statistics (the encoder is the parent's) and write the report."""
    vae, _, vae_id = load_vae_run(run)
    parent_vae, _, parent_id = load_vae_run(parent)
    for (name, a), b in zip(vae.encoder.state_dict().items(), parent_vae.encoder.state_dict().values(), strict=True):
        if not torch.equal(a, b):
            raise RuntimeError(f"encoder tensor {name} differs from the parent's: the latents would not be shared")
    src, dst = latent_cache_dir(ds.root, parent_id), latent_cache_dir(ds.root, vae_id)
    if not (dst / "done").is_file():  # same encoder, same latents: link the cache rather than re-encode
        dst.mkdir(parents=True, exist_ok=True)
        target = dst / "latents.npy"
        if target.exists():
            target.unlink()
        try:
            target.hardlink_to(src / "latents.npy")
        except OSError:
            shutil.copyfile(src / "latents.npy", target)
        (dst / "done").write_text(vae_id + "\n")
    out = finalize_vae(run, ds, report=report)
    (run / "final" / "parent.json").write_text(
        json.dumps({"parent_vae_run": str(parent.resolve()), "parent_vae_id": parent_id, "vae_id": vae_id}, indent=1)
    )
    return out
