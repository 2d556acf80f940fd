"""Samplers in torch, as small pure functions `sample_x(fn, x, sigmas, ...) -> x` (k-diffusion's contract).

`sample_gamma` is METHOD §4's γ-sampling; the runtime's numpy host loop and the fused graphs must match it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .edm import gamma_s
from .models.denoiser import Conditioning, CTMDenoiser

Jump = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t [B], s [B]) -> x_s
Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t [B]) -> x̂_0


def nu_guided(
    fn: Callable[..., torch.Tensor], cond: Conditioning, uncond: Conditioning, omega: float, nu: float
) -> Jump:
    """f_ν(x,t,s) = f(x,t,s;"",ω) + ν·(f(x,t,s;c,ω) − f(x,t,s;"",ω)) for f = G (a jump) or g (a denoiser);
    ν = 1 skips the unconditional pass. cond, uncond: batch-1 conditionings.  # METHOD §4"""

    def guided(x: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        w = torch.full((b,), float(omega), dtype=x.dtype, device=x.device)
        if nu == 1.0:
            return fn(x, t, s, cond.expand(b), w)
        both = fn(
            torch.cat([x, x]),
            torch.cat([t, t]),
            torch.cat([s, s]),
            uncond.expand(b).cat(cond.expand(b)),
            torch.cat([w, w]),
        )
        f_u, f_c = both.chunk(2)
        return f_u + nu * (f_c - f_u)

    return guided


def guided_jump(model: CTMDenoiser, cond: Conditioning, uncond: Conditioning, omega: float, nu: float) -> Jump:
    """G_ν = G(x,t,s;"",ω) + ν·(G(x,t,s;c,ω) - G(x,t,s;"",ω)); ν = 1 skips the unconditional pass. # METHOD §4"""
    return nu_guided(model.G, cond, uncond, omega, nu)


def sample_gamma(
    jump: Jump,
    x_T: torch.Tensor,
    sigmas: torch.Tensor,
    gamma: float,
    noises: Sequence[torch.Tensor],
    sigma_min: float,
) -> torch.Tensor:
    """γ-sampling (METHOD §4). x_T is already scaled (σ_max·ε); noises[i] is ε_i for steps i < steps-1.

    At γ = 0 no noise is injected (s_i = σ_{i+1}), so `noises` may be empty.
    """
    x = x_T
    steps = len(sigmas) - 1
    b = x.shape[0]
    for i in range(steps):
        t = sigmas[i].expand(b)
        s = gamma_s(sigmas[i + 1], gamma, sigma_min).expand(b)
        x = jump(x, t, s)
        if i < steps - 1 and float(gamma) > 0.0:
            x = x + torch.sqrt(sigmas[i + 1] ** 2 - s[0] ** 2) * noises[i]
    return x


def cfg_denoiser(model: CTMDenoiser, cond: Conditioning, uncond: Conditioning, omega: float) -> Denoise:
    """D_ω(x, τ) = D(x,τ,"") + ω·(D(x,τ,c) - D(x,τ,"")), cond and uncond in one doubled batch. # METHOD §3.5"""

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        d = model.D(torch.cat([x, x]), torch.cat([t, t]), uncond.expand(b).cat(cond.expand(b)))
        d_u, d_c = d.chunk(2)
        return d_u + omega * (d_c - d_u)

    return denoise


def heun_step(denoise: Denoise, x: torch.Tensor, t: float | torch.Tensor, t_next: float | torch.Tensor) -> torch.Tensor:
    """One 2nd-order Heun step from t to t_next > 0 (METHOD §3.5)."""
    b = x.shape[0]
    t = torch.as_tensor(t, dtype=x.dtype).expand(b)
    t_next = torch.as_tensor(t_next, dtype=x.dtype).expand(b)
    dt = (t_next - t)[:, None, None]
    d = (x - denoise(x, t)) / t[:, None, None]
    x_e = x + dt * d
    d2 = (x_e - denoise(x_e, t_next)) / t_next[:, None, None]
    return x + dt * (d + d2) / 2


def sample_heun(denoise: Denoise, x_T: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Heun ODE solve along sigmas (all > 0); x_T already scaled by sigmas[0]."""
    x = x_T
    for i in range(len(sigmas) - 1):
        x = heun_step(denoise, x, sigmas[i], sigmas[i + 1])
    return x
