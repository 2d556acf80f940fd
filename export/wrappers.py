"""Export wrappers: static shapes, sigmas as buffers, no training state (STYLE rule 4).

Each wrapper's forward is exactly one bundle graph. Latents crossing a graph boundary are normalised
(METHOD §5: z' = 0.5·(z - μ)/std); the decoder wrappers denormalise inside (z = 2·std·z' + μ).
"""

from __future__ import annotations

import torch
from torch import nn

from ..train.checkpoint import ModelSource
from ..train.edm import gamma_s, karras_sigmas
from ..train.latent import denormalise
from ..train.models.denoiser import Conditioning, CTMDenoiser
from ..train.models.text import TextEncoder
from ..train.models.vae import VAE


class TextEncoderExport(nn.Module):
    """(input_ids, attention_mask) int64 [B, L] -> tokens [B, L, Dt], pooled [B, Dt]."""

    def __init__(self, text: TextEncoder) -> None:
        super().__init__()
        self.text = text

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return self.text(input_ids, attention_mask)


class StudentStepExport(nn.Module):
    """One jump G(x, t, s; cond, ω) (METHOD §2), batched: ν-guidance stacks uncond and cond rows."""

    def __init__(self, student: CTMDenoiser) -> None:
        super().__init__()
        self.student = student

    def forward(self, x, t, s, tokens, token_mask, pooled, omega):
        return self.student.G(x, t, s, Conditioning(tokens, token_mask, pooled), omega)


class DecoderExport(nn.Module):
    """Normalised latent [1, C, T] -> waveform [1, T·hop]: denormalise, pad R frames, run the core."""

    mean: torch.Tensor  # [C]
    std: torch.Tensor  # [C]

    def __init__(self, codec: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        if not isinstance(codec, VAE):
            raise TypeError(f"decoder graphs need a VAE codec, not {type(codec).__name__} (decoded on the host)")
        self.core = codec.decoder
        self.r = codec.cfg.decoder_context
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float())

    def denorm(self, z_norm: torch.Tensor) -> torch.Tensor:
        return denormalise(z_norm, self.mean, self.std)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        z = self.denorm(latent)
        r = self.r
        z = torch.cat([z[..., :1].expand(-1, -1, r), z, z[..., -1:].expand(-1, -1, r)], dim=-1)
        return self.core(z)


class DecoderStreamExport(DecoderExport):
    """Streaming form: a window of chunk + 2R normalised latent frames -> the chunk's audio [1, chunk·hop].

    The host pads the whole latent by R replicated frames once and slides the window by `chunk`; the
    concatenated outputs equal DecoderExport's to float rounding.
    """

    def forward(self, latent_window: torch.Tensor) -> torch.Tensor:
        return self.core(self.denorm(latent_window))


class FusedSamplerExport(nn.Module):
    """The whole γ-sampling loop of METHOD §4 unrolled for a fixed step count (ν = 1), optionally + decode.

    Inputs: eps_T [1, C, T] (standard normal; scaled by σ_max inside), noise [steps-1, 1, C, T] (the per-step
    ε_i; absent for 1 step), tokens, token_mask, pooled (batch 1), omega [1], gamma [1].
    Outputs: latent [1, C, T] normalised (and audio [1, N] when decode is fused).
    """

    def __init__(self, src: ModelSource, steps: int, decode: bool) -> None:
        super().__init__()
        edm = src.config.edm
        self.steps = steps
        self.sigma_min = edm.sigma_min
        self.step = StudentStepExport(src.student)
        self.sigmas: torch.Tensor  # [steps + 1]
        self.register_buffer("sigmas", karras_sigmas(steps + 1, edm.sigma_min, edm.sigma_max, edm.rho))
        self.decoder = DecoderExport(src.codec, src.latent_mean, src.latent_std) if decode else None

    def forward(self, eps_T, noise, tokens, token_mask, pooled, omega, gamma):
        x = self.sigmas[0] * eps_T
        for i in range(self.steps):
            t = self.sigmas[i].reshape(1)
            s = gamma_s(self.sigmas[i + 1], gamma, self.sigma_min).reshape(1)
            x = self.step(x, t, s, tokens, token_mask, pooled, omega)
            if i < self.steps - 1:
                x = x + torch.sqrt(self.sigmas[i + 1] ** 2 - s**2) * noise[i]
        if self.decoder is None:
            return x
        return x, self.decoder(x)


class FusedSamplerExport1(FusedSamplerExport):
    """1-step form without the (empty) per-step noise input."""

    def forward(self, eps_T, tokens, token_mask, pooled, omega, gamma):  # type: ignore[override]
        return super().forward(eps_T, None, tokens, token_mask, pooled, omega, gamma)
