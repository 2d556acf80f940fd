"""Thin wrapper that applies the EDM/CTM scalings around the network (k-diffusion's Denoiser contract)."""

from __future__ import annotations

import torch
from torch import nn

from ..edm import G_from_g, c_in, c_noise, g_from_F
from .dit import DiT


class Conditioning:
    """Text conditioning of a batch: tokens [B, L, Dt], token_mask [B, L], pooled [B, Dt]."""

    __slots__ = ("pooled", "token_mask", "tokens")

    def __init__(self, tokens: torch.Tensor, token_mask: torch.Tensor, pooled: torch.Tensor) -> None:
        self.tokens, self.token_mask, self.pooled = tokens, token_mask, pooled

    def cat(self, other: Conditioning) -> Conditioning:
        return Conditioning(
            torch.cat([self.tokens, other.tokens]),
            torch.cat([self.token_mask, other.token_mask]),
            torch.cat([self.pooled, other.pooled]),
        )

    def to(self, device: str | torch.device) -> Conditioning:
        return Conditioning(self.tokens.to(device), self.token_mask.to(device), self.pooled.to(device))

    def expand(self, b: int) -> Conditioning:
        """Broadcast a batch-1 conditioning to b rows."""
        return Conditioning(self.tokens.expand(b, -1, -1), self.token_mask.expand(b, -1), self.pooled.expand(b, -1))


class CTMDenoiser(nn.Module):
    """g_θ(x_t, t, s, c, ω) and G_θ(x_t, t, s, c, ω) around a DiT (METHOD §2); D_φ(x, t, c) for a teacher (§1)."""

    def __init__(self, net: DiT, sigma_data: float) -> None:
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    def g(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        s: torch.Tensor,
        cond: Conditioning,
        omega: torch.Tensor,
        return_features: bool = False,
    ):
        """c_skip(t)·x_t + c_out(t)·F(c_in(t)·x_t, c_noise(t), c_noise(s), c, ω). t, s, ω: [B]."""
        x_in = c_in(t, self.sigma_data)[:, None, None] * x_t
        out = self.net(
            x_in,
            c_noise(t),
            c_noise(s),
            cond.tokens,
            cond.token_mask,
            cond.pooled,
            omega,
            return_features=return_features,
        )
        if return_features:
            F_out, feats = out
            return g_from_F(x_t, t, F_out, self.sigma_data), feats
        return g_from_F(x_t, t, out, self.sigma_data)

    def G(
        self, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond: Conditioning, omega: torch.Tensor
    ) -> torch.Tensor:
        """Jump from t to s (METHOD §2)."""
        return G_from_g(x_t, t, s, self.g(x_t, t, s, cond, omega))

    def D(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Teacher denoiser: the network at s = t, ω = 0."""
        return self.g(x, t, t, cond, torch.zeros_like(t))
