"""Stage 1: train the 44.1 kHz STFT-domain VAE (METHOD §5) and compute its latent normalisation statistics.

Loss = stft_weight·MR-STFT + mel_weight·multi-scale log-mel L1 + kl_weight·KL (Gaussian bottleneck,
reparameterised z = μ + σ·ε). No adversarial loss: on 2 CPU cores a discriminator would about double the cost
of a step, and the budget buys more by training the reconstruction losses longer; with the GPU config it
remains an open option (documented, not implemented).

After training (rank 0): final/vae.safetensors (fp32) and final/vae_fp16.safetensors; the posterior means of
every clip of the dataset cached once (data.cache_latents); per-channel statistics μ_c, std_c over the
*training* clips' latent frames in final/latent_stats.safetensors (METHOD §5: z' = 0.5·(z − μ_c)/std_c);
report/test_metrics.json + test_spectrograms.png (report.reconstruction_report). Without validation clips
there are no validation reconstructions, without test clips no report: the run says so once when it starts.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .data import ClipDataset, cache_latents, check_splits
from .loop import (
    EMA,
    DistEnv,
    IntervalMeans,
    RunDir,
    apply_overrides,
    build_table,
    configure_logging,
    init_distributed,
    local_batch_size,
    lr_at,
    progress_bar,
    save_safetensors,
    shard,
    shutdown,
    step_generator,
    wrap_ddp,
)
from .loop import batches as make_batches
from .losses import gaussian_kl, mel_l1, mr_stft_loss
from .models.config import ModelConfig, load_model_config, load_toml
from .models.vae import VAE

logger = logging.getLogger(__name__)

VALIDATION_SKIPPED = "no validation reconstructions"
REPORT_SKIPPED = "no reconstruction report (report/test_metrics.json)"


@dataclass(frozen=True)
class VAETrainConfig:
    """The [vae_train] table."""

    steps: int = 4000  # optimiser steps (the lr schedule's length)
    batch_size: int = 16  # global batch of crops
    segment_frames: int = 32  # crop length in latent frames (x latent_hop samples)
    lr: float = 5e-4
    warmup: int = 200
    final_lr_ratio: float = 0.1  # cosine decay to this fraction of lr
    betas: tuple[float, float] = (0.8, 0.99)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    stft_weight: float = 1.0
    mel_weight: float = 1.0
    kl_weight: float = 1e-4  # small: the latent stays informative; METHOD §5 normalises its scale afterwards
    ema_decay: float = 0.0  # 0 disables the EMA
    seed: int = 0
    log_every: int = 25
    ckpt_every: int = 250
    sample_every: int = 1000  # validation reconstructions (metrics + WAVs)
    eval_clips: int = 8

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.segment_frames < 1:
            raise ValueError("[vae_train] steps, batch_size and segment_frames must be >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("[vae_train] ema_decay must be in [0, 1)")


def resolve(config: str | Path, data: str | Path, **overrides: Any) -> tuple[ModelConfig, VAETrainConfig, dict]:
    """Model config, stage config (with CLI overrides) and the resolved dictionary saved in the run dir."""
    doc = load_toml(config)
    model_cfg = load_model_config(config)
    tcfg = apply_overrides(build_table(VAETrainConfig, doc.get("vae_train", {}), "vae_train"), **overrides)
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
    env = init_distributed(threads)
    configure_logging(env)
    try:
        model_cfg, tcfg, resolved = resolve(config, data, **overrides)
        ds = ClipDataset(data)
        ds.check_matches(model_cfg.vae.sample_rate, model_cfg.dit.latent_frames * model_cfg.vae.latent_hop)
        skipped = {"valid": VALIDATION_SKIPPED, **({"test": REPORT_SKIPPED} if finalize else {})}
        check_splits(ds, "train vae", skipped, batch_size=tcfg.batch_size)
        rd = RunDir(run, env)
        state = rd.start(resolved, resume)
        _fit(env, rd, state, model_cfg, tcfg, ds, max_steps or tcfg.steps)
        if finalize and env.is_main and (max_steps is None or max_steps >= tcfg.steps):
            finalize_vae(rd.path, ds)
        return rd.path
    finally:
        shutdown(env)


def _fit(
    env: DistEnv,
    rd: RunDir,
    state: dict | None,
    model_cfg: ModelConfig,
    tcfg: VAETrainConfig,
    ds: ClipDataset,
    end_step: int,
) -> None:
    torch.manual_seed(tcfg.seed)  # identical initial weights on every rank
    vae = VAE(model_cfg.vae).to(env.device)
    ema = EMA(vae, tcfg.ema_decay) if tcfg.ema_decay > 0 else None
    opt = torch.optim.AdamW(vae.parameters(), lr=tcfg.lr, betas=tcfg.betas, weight_decay=tcfg.weight_decay)
    step = 0
    if state is not None:
        vae.load_state_dict(state["model"])  # (load_state_dict copies onto the module's device)
        opt.load_state_dict(state["opt"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        step = int(state["step"])
        if state.get("world") != env.world:
            logger.warning(
                "resuming a %s-process run with %d processes: the data order changes",
                state.get("world"),
                env.world,
            )
    lossmod = wrap_ddp(VAELoss(vae, tcfg), env)
    hop = model_cfg.vae.latent_hop
    seg = tcfg.segment_frames * hop
    c = model_cfg.vae.latent_channels
    train_idx = ds.indices("train")
    local_b = local_batch_size(tcfg.batch_size, env)
    logger.info(
        "VAE %s params, %d training clips, %d steps (global batch %d, %.2f s crops), %d process(es)",
        f"{sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M",
        len(train_idx),
        end_step,
        tcfg.batch_size,
        seg / ds.sample_rate,
        env.world,
    )

    def checkpoint(k: int) -> None:
        rd.save_checkpoint(
            {
                "step": k,
                "model": vae.state_dict(),
                "opt": opt.state_dict(),
                "world": env.world,
                "ema": ema.state_dict() if ema is not None else None,
            }
        )

    bar = progress_bar(end_step, step, env, "vae")
    means = IntervalMeans(step)
    for k, idx in make_batches(train_idx, tcfg.batch_size, env, tcfg.seed, step, end_step):
        gen = step_generator(tcfg.seed, k)
        u = shard(torch.rand(tcfg.batch_size, generator=gen), env)
        eps = shard(torch.randn(tcfg.batch_size, c, tcfg.segment_frames, generator=gen), env)
        wav = crop_batch(ds, idx, u, seg).to(env.device)
        for g in opt.param_groups:
            g["lr"] = lr_at(k, tcfg.lr, tcfg.warmup, tcfg.steps, tcfg.final_lr_ratio)
        loss, parts = lossmod(wav, eps.to(env.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(vae.parameters(), tcfg.grad_clip)
        opt.step()
        if ema is not None:
            ema.update(vae)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite VAE loss at step {k}")
        means.add({"loss": loss, **parts, "grad_norm": gnorm})
        bar.update(1)
        if k % tcfg.log_every == 0 or k == end_step:
            rec = means.record(k, env)
            rec.update(
                lr=opt.param_groups[0]["lr"],
                audio_s_per_s=rec["steps_per_s"] * local_b * env.world * seg / ds.sample_rate,
            )
            rd.log(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
        if k % tcfg.sample_every == 0 and env.is_main:
            _validate(copy.deepcopy(ema.model if ema is not None else vae).cpu(), ds, rd, k, tcfg.eval_clips)
        if k % tcfg.ckpt_every == 0 or k == end_step:
            checkpoint(k)
    bar.close()
    if env.is_main:
        final = copy.deepcopy(ema.model if ema is not None else vae).cpu()
        meta = {"format": "soundctm-rt-vae/1", "config": model_cfg.to_dict(), "step": end_step}
        save_safetensors(rd.final / "vae.safetensors", final.state_dict(), meta)
        save_safetensors(rd.final / "vae_fp16.safetensors", final.state_dict(), meta, dtype=torch.float16)


@torch.no_grad()
def _validate(vae: VAE, ds: ClipDataset, rd: RunDir, step: int, n: int) -> None:
    """Validation reconstructions: metrics in the log, WAV pairs under samples/vae_<step>/."""
    import soundfile as sf

    from .report import clip_metrics

    idx = ds.indices("valid")[:n]
    if len(idx) == 0:
        return
    vae.eval()
    y = torch.from_numpy(ds.wave(idx))
    y_hat = vae.decode(vae.encode(y)[0])
    m = clip_metrics(y_hat, y, ds.sample_rate)
    rd.log({"step": step, **{f"valid_{k}": float(v.mean()) for k, v in m.items()}})
    out = rd.samples / f"vae_{step:07d}"
    out.mkdir(parents=True, exist_ok=True)
    for j in range(min(4, len(idx))):
        sf.write(out / f"{j}_orig.wav", y[j].numpy(), ds.sample_rate)
        sf.write(out / f"{j}_recon.wav", y_hat[j].numpy(), ds.sample_rate)


def file_id(path: Path) -> str:
    """First 12 hex digits of a file's sha256 (names the latent cache of a VAE)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def load_vae_run(run: str | Path) -> tuple[VAE, ModelConfig, str]:
    """The final fp32 VAE of a run directory, its model config and its id (sha of the weights)."""
    from safetensors import safe_open

    path = Path(run) / "final" / "vae.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run} a finished `train vae` run?")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    cfg = ModelConfig.from_dict(json.loads(meta["config"]))
    vae = VAE(cfg.vae)
    vae.load_state_dict(sd)
    return vae.eval(), cfg, file_id(path)


def load_latent_stats(run: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ_c, std_c) [C] of a finished VAE run (METHOD §5)."""
    from safetensors.torch import load_file

    path = Path(run) / "final" / "latent_stats.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not finalised: run `train vae-finalize --run RUN --data DATA`")
    t = load_file(str(path))
    return t["latent_mean"], t["latent_std"]


def finalize_vae(run: str | Path, ds: ClipDataset, report: bool = True) -> dict[str, Any]:
    """Cache the dataset's latents, compute per-channel statistics over training clips, write the report (not
    when the dataset has no test clips: the callers said so when they started)."""
    run = Path(run)
    vae, cfg, vae_id = load_vae_run(run)
    lat = np.load(cache_latents(ds, vae, vae_id), mmap_mode="r")
    train = np.asarray(lat[ds.indices("train")], dtype=np.float64)  # [n, C, T]
    mu = train.mean(axis=(0, 2))
    std = train.std(axis=(0, 2))
    std = np.maximum(std, 1e-6)  # METHOD §5: z' = 0.5·(z − μ_c)/std_c
    save_safetensors(
        run / "final" / "latent_stats.safetensors",
        {"latent_mean": torch.from_numpy(mu).float(), "latent_std": torch.from_numpy(std).float()},
        {"vae_id": vae_id, "clips": str(train.shape[0])},
    )
    (run / "final" / "latent_stats.json").write_text(
        json.dumps({"vae_id": vae_id, "latent_mean": mu.tolist(), "latent_std": std.tolist()}, indent=1)
    )
    logger.info(
        "latent stats over %d training clips: |mean| %.3f, std range %.3f..%.3f",
        train.shape[0],
        float(np.abs(mu).mean()),
        float(std.min()),
        float(std.max()),
    )
    out: dict[str, Any] = {"vae_id": vae_id}
    if report and len(ds.indices("test")):
        from .report import MelPCA, reconstruction_report

        # the PCA baseline keeps as many numbers per second as the latent (report module docstring)
        k = max(1, round(cfg.vae.latent_channels * MelPCA.hop / cfg.vae.latent_hop))
        with torch.no_grad():
            out["report"] = reconstruction_report(
                lambda y: vae.decode(vae.encode(y)[0]), ds, "test", run / "report", pca_components=k
            )
    return out
