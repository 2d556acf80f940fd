"""The diffusion latent, one home for train, export, eval and control (METHOD §5, §5b).

A *codec* maps audio to the latent and back behind one contract, whatever the latent is:
  encode(wav [B, T·hop]) -> (z [B, C, T], logvar)   raw (unnormalised) latent; logvar is zeros for a fixed code
  decode(z [B, C, T]) -> wav [B, T·hop]              no gradient needed through it
  intensity_db(z [B, C, T]) -> [B, T]                frame RMS in dBFS (METHOD §6), differentiable in z
and the normalisation z' = 0.5·(z − μ)/std with per-channel statistics over the training clips, stored in every
checkpoint and bundle.

- MelCodec: the fixed log-mel code of soundctm_rt.melcode (the default at CPU scale); encode runs the same
  filterbank in torch, decode is the runtime's chunked fast Griffin-Lim, intensity is read from the mel.
- train.models.vae.VAE: the learned latent, for users who can train it (decode is its decoder).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from soundctm_rt.melcode import MelCodeConfig, MelDecoder, mel_filterbank

from .models.config import ModelConfig
from .models.vae import VAE

if TYPE_CHECKING:
    from .data import ClipDataset
    from .loop import DistEnv

logger = logging.getLogger(__name__)


def normalise(z: torch.Tensor, mu: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """z' = 0.5·(z − μ_c)/std_c over [.., C, T]  # METHOD §5"""
    return 0.5 * (z - mu[:, None]) / std[:, None]


def denormalise(zn: torch.Tensor, mu: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """z = 2·std_c·z' + μ_c  # METHOD §5"""
    return 2.0 * std[:, None] * zn + mu[:, None]


def decode_latent(codec: Codec, zn: torch.Tensor, mu: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Normalised latent [B, C, T] -> waveform [B, T·hop]: denormalise (METHOD §5), then the codec's decode."""
    return codec.decode(denormalise(zn, mu, std))


class MelCodec(nn.Module):
    """The fixed log-mel code (METHOD §5b) behind the latent contract. No weights: buffers only."""

    fb: torch.Tensor  # [M, F]
    fb_pinv: torch.Tensor  # [F, M]
    window: torch.Tensor  # [n_fft]

    def __init__(self, cfg: MelCodeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        fb = mel_filterbank(cfg)
        self.register_buffer("fb", torch.from_numpy(fb), persistent=False)  # [M, F]
        pinv = np.linalg.pinv(fb.astype(np.float64)).astype(np.float32)
        self.register_buffer("fb_pinv", torch.from_numpy(pinv), persistent=False)  # [F, M], made once
        self.register_buffer("window", torch.hann_window(cfg.n_fft, periodic=True), persistent=False)
        self._decoder: MelDecoder | None = None
        # Parseval: Σ_k |X_k|² = n·Σ(w·x)², and Σ w² = 3n/8 for the Hann window
        self._rms_scale = 1.0 / (cfg.n_fft * math.sqrt(0.375))

    def stft_magnitude(self, wav: torch.Tensor) -> torch.Tensor:
        """[B, T·hop] -> [B, F, T], frame j centred at (j+½)·hop (soundctm_rt.melcode.stft_magnitude)."""
        c = self.cfg
        pad = (c.n_fft - c.hop) // 2
        xp = torch.nn.functional.pad(wav, (pad, pad))
        spec = torch.stft(xp, c.n_fft, c.hop, window=self.window, center=False, return_complex=True)
        return spec.abs()

    def encode(self, wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """wav [B, T·hop] -> (log-mel [B, n_mels, T], zeros): the VAE's (mean, logvar) contract."""
        mel = torch.einsum("mf,bft->bmt", self.fb, self.stft_magnitude(wav))
        z = torch.log(torch.clamp(mel, min=self.cfg.log_floor))
        return z, torch.zeros_like(z)

    @property
    def decoder(self) -> MelDecoder:
        """The runtime's numpy decoder of this code (made on first use)."""
        if self._decoder is None:
            self._decoder = MelDecoder(self.cfg)
        return self._decoder

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """log-mel [B, n_mels, T] -> wav [B, T·hop] by the runtime's Griffin-Lim decoder (no gradient)."""
        wav = self.decoder.decode(z.detach().float().cpu().numpy())
        return torch.from_numpy(wav).to(z.device)

    def intensity_db(self, z: torch.Tensor) -> torch.Tensor:
        """Frame RMS in dBFS from the log-mel [B, M, T] -> [B, T] (METHOD §6, without decoding).

        The filterbank's pseudo-inverse gives linear magnitudes; Parseval over the Hann-windowed frame turns
        their energy into the frame's RMS (a full-scale sine reads about −3 dB).
        """
        mel = torch.clamp(torch.exp(z) - self.cfg.log_floor, min=0.0)  # the floor is silence (melcode)
        mag = torch.clamp(torch.einsum("fm,bmt->bft", self.fb_pinv, mel), min=0.0)
        energy = 2.0 * mag[:, 1:-1].pow(2).sum(1) + mag[:, 0].pow(2) + mag[:, -1].pow(2)
        rms = torch.sqrt(energy + 1e-20) * self._rms_scale
        return 20.0 * torch.log10(rms + 1e-10)


Codec = MelCodec | VAE  # the latent contract of the module docstring


def build_codec(cfg: ModelConfig) -> Codec:
    """The codec of a model config: MelCodec for latent = "mel", a fresh VAE for "vae"."""
    return MelCodec(cfg.mel) if cfg.latent == "mel" else VAE(cfg.vae)


def mel_id(cfg: MelCodeConfig) -> str:
    """A stable id of a mel code (its defining fields only): names the latent cache."""
    blob = json.dumps(cfg.code_fields(), sort_keys=True).encode()
    return "mel-" + hashlib.sha1(blob).hexdigest()[:12]


def latent_statistics(latents: np.ndarray, train_idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (μ_c, std_c) [C] over every frame of the training clips (METHOD §5)."""
    train = np.asarray(latents[train_idx], dtype=np.float64)  # [n, C, T]
    mu = train.mean(axis=(0, 2))
    std = np.maximum(train.std(axis=(0, 2)), 1e-6)
    return torch.from_numpy(mu).float(), torch.from_numpy(std).float()


def save_statistics(path: Path, mu: torch.Tensor, std: torch.Tensor, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latent_mean": mu.contiguous(), "latent_std": std.contiguous()}, str(path), metadata=meta)


def load_statistics(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: latent statistics were not computed")
    t = load_file(str(path))
    return t["latent_mean"], t["latent_std"]


def resolve_latent(
    model_cfg: ModelConfig, ds: ClipDataset, vae_run: str | Path | None, env: DistEnv
) -> tuple[Codec, np.ndarray, torch.Tensor, torch.Tensor, dict[str, str]]:
    """The codec of a training stage, the dataset's cached raw latents [n, C, T] (memory-mapped), (μ, std) and
    provenance. For "mel" the cache and the statistics are made on first use; "vae" needs a finished run."""
    from .data import cache_latents, latent_cache_dir
    from .loop import barrier

    if model_cfg.latent == "mel":
        if vae_run is not None:
            raise ValueError("the config's latent is the mel code: --vae applies only to latent = 'vae'")
        codec: Codec = MelCodec(model_cfg.mel)
        latent_id = mel_id(model_cfg.mel)
        stats_path = latent_cache_dir(ds.root, latent_id) / "latent_stats.safetensors"
        if env.is_main:
            path = cache_latents(ds, codec, latent_id)
            if not stats_path.is_file():
                mu, std = latent_statistics(np.load(path, mmap_mode="r"), ds.indices("train"))
                save_statistics(stats_path, mu, std, {"latent_id": latent_id})
        barrier(env)
        mu, std = load_statistics(stats_path)
        provenance = {"latent": "mel", "latent_id": latent_id}
    else:
        from .vae_run import load_latent_stats, load_vae_run

        if vae_run is None:
            raise ValueError("the config's latent is a VAE: pass --vae RUN (a finished `train vae` run)")
        vae, vae_cfg, latent_id = load_vae_run(vae_run)
        if vae_cfg.vae != model_cfg.vae:
            raise ValueError(
                f"the VAE run {vae_run} was trained with [vae] {vae_cfg.vae}, the config has {model_cfg.vae}"
            )
        mu, std = load_latent_stats(vae_run)
        if env.is_main:
            cache_latents(ds, vae, latent_id)
        barrier(env)
        codec = vae
        provenance = {"latent": "vae", "vae_run": str(Path(vae_run).resolve()), "vae_id": latent_id}
    latents = np.load(latent_cache_dir(ds.root, latent_id) / "latents.npy", mmap_mode="r")
    return codec, latents, mu, std, provenance
