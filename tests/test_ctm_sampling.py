"""METHOD §4 with the real (tiny) student: γ = 0 sampling is the chain of its jumps, and the student's own Heun ODE
sampling uses g(x, t, t; ω) with ν-guidance. (The numpy runtime's host loop against the torch γ-sampler, γ = 0
included, is test_torch_numpy_parity.)"""

from __future__ import annotations

import torch

from soundctm_rt.train.ctm import student_denoiser
from soundctm_rt.train.edm import karras_sigmas, sampling_sigmas
from soundctm_rt.train.models.denoiser import Conditioning
from soundctm_rt.train.sampling import guided_jump, heun_step, sample_gamma, sample_heun


def _conds(src) -> tuple[Conditioning, Conditioning]:
    g = torch.Generator().manual_seed(5)
    H = src.text.hidden_size
    return (
        Conditioning(torch.randn(1, 4, H, generator=g), torch.ones(1, 4), torch.randn(1, H, generator=g)),
        Conditioning(torch.randn(1, 4, H, generator=g), torch.ones(1, 4), torch.randn(1, H, generator=g)),
    )


def test_gamma_zero_is_the_chain_of_the_students_jumps(tiny_source):
    src = tiny_source
    cond, uncond = _conds(src)
    c, T = src.config.latent_channels, src.config.dit.latent_frames
    steps, omega, nu = 4, 3.0, 2.0
    sig = sampling_sigmas(steps, src.config.edm)
    x_T = sig[0] * torch.randn(2, c, T)
    noises = [100 * torch.randn(2, c, T) for _ in range(steps - 1)]  # must be ignored at γ = 0
    with torch.no_grad():
        got = sample_gamma(guided_jump(src.student, cond, uncond, omega, nu), x_T, sig, 0.0, noises, 0.002)
        x = x_T
        w = torch.full((2,), omega)
        for i in range(steps):
            t, s = sig[i].expand(2), sig[i + 1].expand(2)
            G_u = src.student.G(x, t, s, uncond.expand(2), w)
            G_c = src.student.G(x, t, s, cond.expand(2), w)
            x = G_u + nu * (G_c - G_u)  # METHOD §4 ν-guidance, x ← G_ν(x, σ_i, σ_{i+1})
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5 * float(x.abs().max()))


def test_student_ode_sampling_uses_its_own_denoiser(tiny_source):
    src = tiny_source
    cond, uncond = _conds(src)
    c, T = src.config.latent_channels, src.config.dit.latent_frames
    e = src.config.edm
    sig = karras_sigmas(5, e.sigma_min, e.sigma_max, e.rho)
    x_T = sig[0] * torch.randn(1, c, T)
    w = torch.full((1,), 4.0)
    with torch.no_grad():
        for nu in (1.0, 1.5):
            got = sample_heun(student_denoiser(src.student, cond, uncond, 4.0, nu), x_T, sig)

            def g_nu(x, t, nu=nu):
                g_c = src.student.g(x, t, t, cond, w)
                g_u = src.student.g(x, t, t, uncond, w)
                return g_u + nu * (g_c - g_u)

            x = x_T
            for i in range(len(sig) - 1):
                x = heun_step(g_nu, x, sig[i], sig[i + 1])
            torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5 * float(x.abs().max()))
