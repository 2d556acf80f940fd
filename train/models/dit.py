"""Diffusion transformer F(c_in·x_t, c_noise(t), c_noise(s), text, ω) over latent frames (METHOD §2).

The teacher and the student are this one class. The teacher is called with s = t and ω = 0; the student adds
its s-embedding through the *same* time embedding (summed, as the releases do) and a fixed sinusoidal
embedding of 1000·ω with no learned layer. The ω-embedding is written as [sin, cos - 1] so that it is exactly
zero at ω = 0: a student copied from the teacher then computes g(x, t, t; ω = 0) = D_teacher(x, t) bit for bit,
which is what "the student starts as an exact copy of the teacher" asks of it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import DiTConfig


def sinusoidal(v: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[B] -> [B, dim]: [cos(v·f_k), sin(v·f_k)], f_k geometric from 1 to 1/max_period."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=v.device) / half)
    args = v[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def omega_embedding(omega: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of 1000·ω, zero at ω = 0 (METHOD §2: no learned layer)."""
    e = sinusoidal(1000.0 * omega, dim)
    half = dim // 2
    return torch.cat([e[:, :half] - 1.0, e[:, half:]], dim=-1)


class FourierFeatures(nn.Module):
    """Random Fourier features of c_noise, frequencies fixed at construction (EDM's FourierEmbedding)."""

    freqs: torch.Tensor  # [dim / 2]

    def __init__(self, dim: int, scale: float = 16.0, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(dim // 2, generator=g) * scale)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        args = (2 * math.pi) * v[:, None] * self.freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Attention(nn.Module):
    """Multi-head attention written with matmul + softmax so that every exporter maps it to plain ops."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None) -> None:
        super().__init__()
        kv_dim = kv_dim or dim
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kv_dim, dim)
        self.v = nn.Linear(kv_dim, dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, N, D], ctx [B, M, Dkv], bias [B, 1, 1, M] additive (0 or -1e4) -> [B, N, D]."""
        B, N, D = x.shape
        h = self.heads
        q = self.q(x).reshape(B, N, h, D // h).transpose(1, 2)
        k = self.k(ctx).reshape(B, -1, h, D // h).transpose(1, 2)
        v = self.v(ctx).reshape(B, -1, h, D // h).transpose(1, 2)
        att = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(D // h))
        if bias is not None:
            att = att + bias
        out = att.softmax(dim=-1) @ v
        return self.o(out.transpose(1, 2).reshape(B, N, D))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention, cross-attention to the text tokens, and an MLP."""

    def __init__(self, dim: int, heads: int, text_dim: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.cross = Attention(dim, heads, kv_dim=text_dim)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, tokens: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(F.silu(emb)).chunk(6, dim=-1)
        h = modulate(self.norm1(x), sh1, sc1)
        x = x + g1[:, None] * self.attn(h, h)
        x = x + self.cross(self.norm2(x), tokens, bias)
        x = x + g2[:, None] * self.mlp(modulate(self.norm3(x), sh2, sc2))
        return x


class DiT(nn.Module):
    """The network F_θ: input c_in(t)·x_t [B, C, T] latent frames, output [B, C, T]. Each token holds `patch`
    consecutive frames (all C channels of each), so the sequence has T / patch tokens."""

    pos: torch.Tensor  # [1, tokens, D] sinusoidal positions

    def __init__(self, cfg: DiTConfig, latent_channels: int, text_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        self.patch = cfg.patch
        self.proj_in = nn.Linear(latent_channels * cfg.patch, d)
        tokens = cfg.latent_frames // cfg.patch
        self.register_buffer("pos", sinusoidal(torch.arange(tokens).float(), d)[None], persistent=False)
        self.time_features = FourierFeatures(cfg.fourier_features)
        self.time_mlp = nn.Sequential(nn.Linear(cfg.fourier_features, d), nn.SiLU(), nn.Linear(d, d))
        self.pooled_proj = nn.Linear(text_dim, d)
        self.blocks = nn.ModuleList([DiTBlock(d, cfg.heads, text_dim, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(d, 2 * d)
        self.proj_out = nn.Linear(d, latent_channels * cfg.patch)  # "the student's last layer" of METHOD §3.9
        for m in (self.ada_out, self.proj_out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def embed(self, c_noise_t: torch.Tensor, c_noise_s: torch.Tensor, omega: torch.Tensor, pooled: torch.Tensor):
        """Global conditioning: emb(t) + emb(s) through one time embedding, + ω-embedding, + pooled text."""
        emb = self.time_mlp(self.time_features(c_noise_t)) + self.time_mlp(self.time_features(c_noise_s))
        return emb + omega_embedding(omega, self.cfg.width) + self.pooled_proj(pooled)

    def forward(
        self,
        x_in: torch.Tensor,
        c_noise_t: torch.Tensor,
        c_noise_s: torch.Tensor,
        tokens: torch.Tensor,
        token_mask: torch.Tensor,
        pooled: torch.Tensor,
        omega: torch.Tensor,
        return_features: bool = False,
    ):
        """x_in [B, C, T]; c_noise_* [B]; tokens [B, L, Dt]; token_mask [B, L] (1 = real token);
        pooled [B, Dt]; omega [B]. Returns F [B, C, T], and with return_features the list of the
        sequential block outputs [B, T / patch, D] (input to METHOD §3.7's distance)."""
        B, C, T = x_in.shape
        p, n = self.patch, T // self.patch
        tok = x_in.reshape(B, C, n, p).permute(0, 2, 3, 1).reshape(B, n, p * C)  # token = p frames × C
        x = self.proj_in(tok) + self.pos[:, :n]
        emb = self.embed(c_noise_t, c_noise_s, omega, pooled)
        bias = ((1.0 - token_mask.float()) * -1e4)[:, None, None, :]
        feats = []
        for blk in self.blocks:
            x = blk(x, emb, tokens, bias)
            feats.append(x)
        shift, scale = self.ada_out(F.silu(emb)).chunk(2, dim=-1)
        out = self.proj_out(modulate(self.norm_out(x), shift, scale))  # [B, n, p·C]
        out = out.reshape(B, n, p, C).permute(0, 3, 1, 2).reshape(B, C, T)
        return (out, feats) if return_features else out
