"""STFT-domain VAE with an iSTFT head (Vocos-like), 44.1 kHz mono, Gaussian bottleneck (METHOD §5).

The decoder is a *core* of valid (unpadded) convolutions followed by overlap-add that keeps only fully
covered samples, so decoding a window of latent frames with R = cfg.decoder_context frames of context on each
side gives exactly the samples of its central frames. Full decode pads the latent by R frames (replicate,
which commutes with the per-channel normalisation) and runs the core once; streaming decode runs the same core
on fixed windows. The two are equal to float rounding, which is what lets audio start before a clip is decoded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VAEConfig
from .dsp import HANN_OLA_GAIN, InverseRFFT, hann, overlap_add_valid

LOG_MAG_MAX = 8.0  # clamp of the predicted log-magnitude, so exp() cannot overflow early in training


class ChannelNorm(nn.Module):
    """LayerNorm over channels of [B, C, T] (per frame: no statistics across time, so streaming is exact)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x.transpose(1, 2)).transpose(1, 2)


class ConvNeXt1d(nn.Module):
    """Depthwise conv -> norm -> pointwise MLP -> layer scale -> residual. `valid` drops the padding."""

    def __init__(self, dim: int, kernel: int, valid: bool) -> None:
        super().__init__()
        self.valid = valid
        self.crop = kernel // 2
        self.dw = nn.Conv1d(dim, dim, kernel, padding=0 if valid else kernel // 2, groups=dim)
        self.norm = ChannelNorm(dim)
        self.pw1 = nn.Conv1d(dim, 3 * dim, 1)
        self.pw2 = nn.Conv1d(3 * dim, dim, 1)
        self.scale = nn.Parameter(torch.full((dim, 1), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pw2(F.gelu(self.pw1(self.norm(self.dw(x)))))
        skip = x[..., self.crop : x.shape[-1] - self.crop] if self.valid else x
        return skip + self.scale * h


class Encoder(nn.Module):
    """Waveform [B, N] -> (mean, logvar) [B, C, N / latent_hop]."""

    window: torch.Tensor  # [n_fft]

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        bins = cfg.n_fft // 2 + 1
        self.register_buffer("window", hann(cfg.n_fft), persistent=False)
        self.conv_in = nn.Conv1d(3 * bins, cfg.width, 1)
        self.pre = nn.Sequential(*[ConvNeXt1d(cfg.width, cfg.kernel, valid=False) for _ in range(cfg.encoder_blocks)])
        self.down = nn.Conv1d(cfg.width, cfg.width, cfg.downsample, stride=cfg.downsample)
        self.post = nn.Sequential(*[ConvNeXt1d(cfg.width, cfg.kernel, valid=False) for _ in range(cfg.encoder_blocks)])
        self.norm = ChannelNorm(cfg.width)
        self.conv_out = nn.Conv1d(cfg.width, 2 * cfg.latent_channels, 1)

    def features(self, wav: torch.Tensor) -> torch.Tensor:
        """[B, N] -> [B, 3·bins, N / hop]: log-magnitude and power-law compressed real/imag parts."""
        X = torch.stft(wav, self.cfg.n_fft, self.cfg.hop, window=self.window, center=True, return_complex=True)
        X = X[..., : wav.shape[-1] // self.cfg.hop]  # frame k is centred on sample k·hop; drop the tail frame
        mag = X.abs()
        comp = X / (mag + 1e-5) ** 0.7
        return torch.cat([torch.log(mag + 1e-5), comp.real, comp.imag], dim=1)

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.pre(self.conv_in(self.features(wav)))
        h = self.conv_out(self.norm(self.post(self.down(h))))
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-20.0, 10.0)


class DecoderCore(nn.Module):
    """Latent window [B, C, W] -> audio of its central W - 2R frames [B, (W - 2R)·latent_hop] (valid)."""

    window: torch.Tensor  # [n_fft], overlap-add gain folded in

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        bins = cfg.n_fft // 2 + 1
        self.conv_in = nn.Conv1d(cfg.latent_channels, cfg.width, 3)
        self.blocks = nn.Sequential(*[ConvNeXt1d(cfg.width, cfg.kernel, valid=True) for _ in range(cfg.decoder_blocks)])
        self.norm = ChannelNorm(cfg.width)
        self.up = nn.ConvTranspose1d(cfg.width, cfg.width, cfg.downsample, stride=cfg.downsample)
        self.head = nn.Conv1d(cfg.width, 2 * bins, 1)
        self.irfft = InverseRFFT(cfg.n_fft)
        self.register_buffer("window", hann(cfg.n_fft) / HANN_OLA_GAIN, persistent=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        h = self.up(F.gelu(self.norm(self.blocks(self.conv_in(z)))))  # [B, width, D·W'] STFT frames
        log_mag, phase = self.head(h).transpose(1, 2).chunk(2, dim=-1)  # [B, F, bins] each
        mag = torch.exp(log_mag.clamp(max=LOG_MAG_MAX))
        frames = self.irfft(mag * torch.cos(phase), mag * torch.sin(phase)) * self.window
        y = overlap_add_valid(frames, cfg.hop)
        # valid OLA output starts (D - 1)·hop samples before the first central latent frame (module docstring)
        w_out = z.shape[-1] - 2 * cfg.decoder_context
        start = (cfg.downsample - 1) * cfg.hop
        return y[:, start : start + w_out * cfg.latent_hop]


class VAE(nn.Module):
    """Encoder, Gaussian bottleneck and streaming-exact decoder."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = DecoderCore(cfg)

    def encode(self, wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, N] with N a multiple of latent_hop -> (mean, logvar) [B, C, N / latent_hop]."""
        return self.encoder(wav)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latent [B, C, T] -> waveform [B, T·latent_hop]."""
        return self.decoder(pad_context(z, self.cfg.decoder_context))


def pad_context(z: torch.Tensor, r: int) -> torch.Tensor:
    """Replicate the edge frames r times on each side ([B, C, T] -> [B, C, T + 2r])."""
    return torch.cat([z[..., :1].expand(-1, -1, r), z, z[..., -1:].expand(-1, -1, r)], dim=-1)
