"""EDM noise process, preconditioning and the CTM jump, as small pure torch functions (METHOD §1, §2)."""

from __future__ import annotations

import torch

from .models.config import EDMConfig


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """Karras grid of n points from sigma_max (k = 0) down to sigma_min (k = n-1).  # METHOD §1"""
    if n < 2:
        raise ValueError("a Karras grid needs at least 2 points")
    k = torch.arange(n, dtype=torch.float64)
    inv_rho = 1.0 / rho
    s = (sigma_max**inv_rho + k / (n - 1) * (sigma_min**inv_rho - sigma_max**inv_rho)) ** rho
    return s.float()


def c_skip(t: torch.Tensor, sigma_data: float) -> torch.Tensor:
    return sigma_data**2 / (t**2 + sigma_data**2)  # METHOD §1


def c_out(t: torch.Tensor, sigma_data: float) -> torch.Tensor:
    return t * sigma_data / torch.sqrt(t**2 + sigma_data**2)  # METHOD §1


def c_in(t: torch.Tensor, sigma_data: float) -> torch.Tensor:
    return 1.0 / torch.sqrt(t**2 + sigma_data**2)  # METHOD §1


def c_noise(t: torch.Tensor) -> torch.Tensor:
    return torch.log(t) / 4.0  # METHOD §1


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """[B] -> [B, 1, ...] with ndim dims in all."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def g_from_F(x_t: torch.Tensor, t: torch.Tensor, F_out: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """g = c_skip(t)·x_t + c_out(t)·F (METHOD §2; also the teacher's D with s = t, §1)."""
    t_ = append_dims(t, x_t.ndim)
    return c_skip(t_, sigma_data) * x_t + c_out(t_, sigma_data) * F_out


def G_from_g(x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Jump from t to s <= t: G = (s/t)·x_t + (1 - s/t)·g.  G(x, t, t) = x.  # METHOD §2"""
    ratio = append_dims(s / t, x_t.ndim)
    return ratio * x_t + (1.0 - ratio) * g


def gamma_s(sigma_next: torch.Tensor | float, gamma: torch.Tensor | float, sigma_min: float) -> torch.Tensor:
    """s_i = sqrt(1 - gamma^2)·(sigma_{i+1} - sigma_min) + sigma_min.  # METHOD §4"""
    gamma = torch.as_tensor(gamma, dtype=torch.float32)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32)
    return torch.sqrt(1.0 - gamma**2) * (sigma_next - sigma_min) + sigma_min


def sampling_sigmas(steps: int, edm: EDMConfig) -> torch.Tensor:
    """steps+1 Karras points from sigma_max to sigma_min (METHOD §4)."""
    return karras_sigmas(steps + 1, edm.sigma_min, edm.sigma_max, edm.rho)


def dsm_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM loss weight w(σ) = (σ² + σ_d²)/(σ·σ_d)².  # METHOD §3.8"""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


LOG_SIGMA_MEAN = -1.2  # METHOD §3.8: ln σ ~ N(-1.2, 1.2²)
LOG_SIGMA_STD = 1.2
