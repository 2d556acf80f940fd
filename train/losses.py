"""Training losses and reconstruction metrics as small pure functions (waveforms are [B, N] at 44.1 kHz).

VAE: multi-resolution STFT (spectral convergence + log-magnitude L1), multi-scale log-mel L1 and the Gaussian
KL (METHOD §5). Teacher: the EDM denoising loss (METHOD §1 preconditioning, lognormal σ and w(σ) of §3.8).
Metrics for the report: MR-STFT distance, mel L1, SI-SDR.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
import torch

from .edm import LOG_SIGMA_MEAN, LOG_SIGMA_STD, dsm_weight

MAG_EPS = 1e-5  # floor of magnitudes before the log (-100 dB re full scale)
DEFAULT_STFT_RES: tuple[tuple[int, int], ...] = (
    (256, 64),
    (512, 128),
    (1024, 256),
    (2048, 512),
    (4096, 1024),
)
DEFAULT_MEL_RES: tuple[tuple[int, int, int], ...] = ((512, 128, 40), (1024, 256, 64), (2048, 512, 128))


def stft_mag(x: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """[B, N] -> magnitude [B, n_fft/2+1, frames] (Hann window, centred frames)."""
    win = torch.hann_window(n_fft, dtype=x.dtype, device=x.device)
    return torch.stft(x, n_fft, hop, window=win, center=True, return_complex=True).abs()


def mr_stft_loss(
    y_hat: torch.Tensor, y: torch.Tensor, resolutions: Sequence[tuple[int, int]] = DEFAULT_STFT_RES
) -> torch.Tensor:
    """Multi-resolution STFT distance: mean over resolutions of spectral convergence + log-magnitude L1.

    Spectral convergence ‖|Y| − |Ŷ|‖_F / ‖|Y|‖_F is taken over the whole batch (silent padded clips would make
    a per-clip ratio explode). Returns a scalar.
    """
    total = y.new_zeros(())
    for n_fft, hop in resolutions:
        m_hat, m = stft_mag(y_hat, n_fft, hop), stft_mag(y, n_fft, hop)
        sc = torch.linalg.vector_norm(m - m_hat) / torch.linalg.vector_norm(m).clamp(min=1e-8)
        log_l1 = (torch.log(m_hat + MAG_EPS) - torch.log(m + MAG_EPS)).abs().mean()
        total = total + sc + log_l1
    return total / len(resolutions)


def hz_to_mel(f: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + f / 700.0)


def mel_to_hz(m: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


@lru_cache(maxsize=16)
def _mel_fb_np(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    bins = n_fft // 2 + 1
    freqs = np.linspace(0.0, sample_rate / 2, bins)
    pts = mel_to_hz(np.linspace(hz_to_mel(np.array(fmin)), hz_to_mel(np.array(fmax)), n_mels + 2))
    fb = np.zeros((n_mels, bins), dtype=np.float64)
    for i in range(n_mels):
        lo, c, hi = pts[i], pts[i + 1], pts[i + 2]
        up = (freqs - lo) / max(c - lo, 1e-9)
        down = (hi - freqs) / max(hi - c, 1e-9)
        fb[i] = np.clip(np.minimum(up, down), 0.0, None)
        fb[i] *= 2.0 / max(hi - lo, 1e-9)  # Slaney area normalisation
    return fb.astype(np.float32)


def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None
) -> torch.Tensor:
    """Triangular mel filterbank [n_mels, n_fft/2+1] (HTK mel scale, Slaney area normalisation)."""
    return torch.from_numpy(_mel_fb_np(sample_rate, n_fft, n_mels, fmin, fmax or sample_rate / 2.0))


def log_mel(x: torch.Tensor, sample_rate: int, n_fft: int, hop: int, n_mels: int) -> torch.Tensor:
    """[B, N] -> natural-log mel magnitude [B, n_mels, frames]."""
    fb = mel_filterbank(sample_rate, n_fft, n_mels).to(x)
    return torch.log(fb @ stft_mag(x, n_fft, hop) + MAG_EPS)


def mel_l1(
    y_hat: torch.Tensor,
    y: torch.Tensor,
    sample_rate: int,
    resolutions: Sequence[tuple[int, int, int]] = DEFAULT_MEL_RES,
) -> torch.Tensor:
    """Mean over (n_fft, hop, n_mels) scales of the L1 distance between log-mel spectrograms. Scalar."""
    total = y.new_zeros(())
    for n_fft, hop, n_mels in resolutions:
        total = (
            total
            + (log_mel(y_hat, sample_rate, n_fft, hop, n_mels) - log_mel(y, sample_rate, n_fft, hop, n_mels))
            .abs()
            .mean()
        )
    return total / len(resolutions)


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) ‖ N(0, 1)) per latent element, averaged. Scalar."""
    return 0.5 * (mean**2 + logvar.exp() - 1.0 - logvar).mean()


def si_sdr(est: torch.Tensor, ref: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale-invariant SDR in dB per example: [B, N] x [B, N] -> [B] (zero-mean; Le Roux et al. 2019)."""
    est = est - est.mean(-1, keepdim=True)
    ref = ref - ref.mean(-1, keepdim=True)
    alpha = (est * ref).sum(-1, keepdim=True) / (ref.pow(2).sum(-1, keepdim=True) + eps)
    target = alpha * ref
    noise = est - target
    return 10.0 * torch.log10((target.pow(2).sum(-1) + eps) / (noise.pow(2).sum(-1) + eps))


def sample_log_normal_sigma(
    n: int, gen: torch.Generator, p_mean: float = LOG_SIGMA_MEAN, p_std: float = LOG_SIGMA_STD
) -> torch.Tensor:
    """σ with ln σ ~ N(p_mean, p_std²) [n]  # METHOD §3.8 (EDM's training distribution: N(−1.2, 1.2²))."""
    return torch.exp(p_mean + p_std * torch.randn(n, generator=gen))


def edm_loss(
    D: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    sigma: torch.Tensor,
    eps: torch.Tensor,
    sigma_data: float,
) -> torch.Tensor:
    """EDM denoising loss mean(w(σ)·(D(x0 + σ·ε, σ) − x0)²), w(σ) = (σ² + σ_d²)/(σ·σ_d)² (METHOD §1, §3.8).

    x0, eps: [B, C, T] normalised latents and unit noise; sigma: [B]. D: (x_σ, σ) -> x̂0. Scalar.
    """
    s = sigma[:, None, None]
    err = (D(x0 + s * eps, sigma) - x0) ** 2
    return (dsm_weight(sigma, sigma_data) * err.mean(dim=(1, 2))).mean()
