"""METHOD §1, §2, §4 in small pure functions: grids, scalings, the CTM jump, γ-sampling in torch and numpy."""

import numpy as np
import pytest
import torch

from soundctm_rt import sampling as np_sampling
from soundctm_rt.train import edm
from soundctm_rt.train.models.dit import omega_embedding


def test_karras_grid_endpoints_and_order():
    s = edm.karras_sigmas(40, 0.002, 80.0, 7.0)
    assert s[0].item() == pytest.approx(80.0) and s[-1].item() == pytest.approx(0.002)
    assert bool((s[:-1] > s[1:]).all())
    np.testing.assert_allclose(np_sampling.karras_sigmas(40, 0.002, 80.0, 7.0), s.numpy(), rtol=1e-6)


def test_preconditioning_limits():
    sd = 0.5
    t = torch.tensor([1e-6, 0.002, 1.0, 80.0])
    assert edm.c_skip(t, sd)[0].item() == pytest.approx(1.0, abs=1e-9)  # c_skip -> 1 as t -> 0
    assert edm.c_out(t, sd)[0].item() == pytest.approx(0.0, abs=1e-5)
    # EDM's choice of c_out makes the training target of F unit-variance:
    # (1 - c_skip)²·σ_d² + c_skip²·t² = c_out²
    cs = edm.c_skip(t, sd)
    torch.testing.assert_close((1 - cs) ** 2 * sd**2 + cs**2 * t**2, edm.c_out(t, sd) ** 2, rtol=1e-5, atol=1e-10)
    torch.testing.assert_close(edm.c_in(t, sd) ** 2 * (t**2 + sd**2), torch.ones(4))


def test_jump_identity_and_endpoint():
    x = torch.randn(2, 3, 5)
    g = torch.randn(2, 3, 5)
    t = torch.tensor([3.0, 0.7])
    torch.testing.assert_close(edm.G_from_g(x, t, t, g), x)  # G(x, t, t) = x
    torch.testing.assert_close(edm.G_from_g(x, t, torch.zeros(2), g), g)  # s = 0: the denoiser


def test_gamma_s():
    assert float(edm.gamma_s(1.0, 0.0, 0.002)) == pytest.approx(1.0)  # γ = 0: s = σ_{i+1}
    assert float(edm.gamma_s(1.0, 1.0, 0.002)) == pytest.approx(0.002)  # γ = 1: s = σ_min
    assert float(np_sampling.gamma_s(np.float32(1.0), 0.5, 0.002)) == pytest.approx(
        float(edm.gamma_s(1.0, 0.5, 0.002)), rel=1e-6
    )


def test_omega_embedding_is_zero_at_zero():
    e = omega_embedding(torch.tensor([0.0, 3.5]), 32)
    assert e.shape == (2, 32)
    assert torch.count_nonzero(e[0]) == 0 and torch.count_nonzero(e[1]) > 0


def test_gamma_zero_sampling_is_the_chain_of_jumps():
    """γ = 0 adds no noise: the result is G(...G(G(x_T, σ0, σ1), σ1, σ2)..., σ_{n-1}, σ_n)."""
    from soundctm_rt.train.sampling import sample_gamma

    sig = edm.karras_sigmas(5, 0.002, 80.0, 7.0)

    def jump(x, t, s):
        return x * (s / t)[:, None, None] + torch.sin(x) * (1 - s / t)[:, None, None]

    x_T = torch.randn(1, 2, 3) * 80
    noises = [torch.randn(1, 2, 3) * 100 for _ in range(3)]
    got = sample_gamma(jump, x_T, sig, 0.0, noises, 0.002)
    x = x_T
    for i in range(4):
        x = jump(x, sig[i].expand(1), sig[i + 1].expand(1))
    torch.testing.assert_close(got, x)


def test_gamma_zero_sampling_needs_no_noise():
    """γ = 0 injects no noise, so the distiller's sample writer may pass none (it once crashed on steps > 1)."""
    import torch

    from soundctm_rt.train.sampling import sample_gamma

    def jump(x, t, s):
        return x * (s / t)[:, None]

    sig = torch.tensor([80.0, 10.0, 1.0, 0.002])
    x_T = torch.randn(2, 3)
    noises = [torch.randn(2, 3) for _ in range(2)]
    torch.testing.assert_close(
        sample_gamma(jump, x_T, sig, 0.0, [], 0.002), sample_gamma(jump, x_T, sig, 0.0, noises, 0.002)
    )
