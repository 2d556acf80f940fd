"""METHOD §2-§3 in train/ctm.py: draws, the Heun teacher solver, the feature distance, DSM, the adaptive weight,
and the student's initialisation from the teacher. Tiny random models, one thread, a few seconds in all."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from soundctm_rt.train import ctm, edm
from soundctm_rt.train.models.config import EDMConfig
from soundctm_rt.train.models.denoiser import Conditioning
from soundctm_rt.train.sampling import heun_step

EDM = EDMConfig()


@pytest.fixture(scope="module")
def teacher(tiny_source):
    """The tiny random model as a frozen teacher (zero-initialised layers perturbed: not an identity map)."""
    t = copy.deepcopy(tiny_source.student)
    return t.requires_grad_(False).eval()


def _cond(src, b: int, seed: int = 0) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    L, H = 5, src.text.hidden_size
    return Conditioning(torch.randn(b, L, H, generator=g), torch.ones(b, L), torch.randn(b, H, generator=g))


def _shape(src) -> tuple[int, int]:
    return src.config.latent_channels, src.config.dit.latent_frames


# -------------------------------------------------------------------------------------------- draws


def test_sample_n_is_proportional_to_n():
    gen = torch.Generator().manual_seed(0)
    max_n, draws = 6, 21000
    counts = np.bincount([ctm.sample_n(max_n, gen) for _ in range(draws)], minlength=max_n + 1)
    assert counts[0] == 0 and counts.sum() == draws
    expected = draws * np.arange(1, max_n + 1) / (max_n * (max_n + 1) / 2)
    chi2 = float((((counts[1:] - expected) ** 2) / expected).sum())
    assert chi2 < 20.5  # chi-square, 5 dof: p = 0.001
    assert ctm.expected_teacher_passes(39) == pytest.approx(2 * 79 / 3)  # E[2n] = 52.7 for N = 40


def test_grid_indices_cover_exactly_the_allowed_ranges():
    gen = torch.Generator().manual_seed(1)
    N = 10
    for n in (1, 4, 9):
        i_t, i_s = ctm.sample_grid_indices(n, N, 4000, gen)
        assert set(i_t.tolist()) == set(range(N - n))  # {0, ..., N-1-n}
        assert bool((i_s >= i_t + n).all() and (i_s <= N - 1).all())
        assert set(i_s.tolist()) == set(range(n, N))
    with pytest.raises(ValueError):
        ctm.sample_grid_indices(N, N, 1, gen)


def test_dsm_sigma_halves():
    gen = torch.Generator().manual_seed(2)
    s = ctm.sample_dsm_sigma(20001, EDM, 0.7, gen)
    ln = torch.log(s[:10001])
    assert float(ln.mean()) == pytest.approx(-1.2, abs=0.05) and float(ln.std()) == pytest.approx(1.2, abs=0.05)
    k = s[10001:]
    inv = 1 / EDM.rho
    lo = (EDM.sigma_max**inv + 0.7 * (EDM.sigma_min**inv - EDM.sigma_max**inv)) ** EDM.rho
    assert float(k.max()) <= EDM.sigma_max + 1e-4 and float(k.min()) >= lo - 1e-6
    assert float(k.min()) < lo * 1.05 and float(k.max()) > 0.95 * EDM.sigma_max


def test_training_sigma_distribution_follows_the_config():
    from soundctm_rt.train.losses import sample_log_normal_sigma

    shifted = EDMConfig(p_mean=0.4, p_std=1.6)
    for draw in (
        torch.log(sample_log_normal_sigma(20000, torch.Generator().manual_seed(4), shifted.p_mean, shifted.p_std)),
        torch.log(ctm.sample_dsm_sigma(40000, shifted, 0.7, torch.Generator().manual_seed(5))[:20000]),
    ):
        assert float(draw.mean()) == pytest.approx(0.4, abs=0.05) and float(draw.std()) == pytest.approx(1.6, abs=0.05)
    with pytest.raises(ValueError, match="p_std"):
        EDMConfig(p_std=0.0)


def test_omega_draws_cover_the_range():
    w = ctm.sample_omega(5000, 2.0, 5.0, torch.Generator().manual_seed(3))
    assert 2.0 <= float(w.min()) < 2.01 and 4.99 < float(w.max()) <= 5.0


# --------------------------------------------------------------------------------------- parameterisation


def test_jump_to_itself_is_identity_with_the_real_student(tiny_source):
    src = tiny_source
    c, T = _shape(src)
    x = torch.randn(3, c, T) * 5
    t = torch.tensor([80.0, 1.3, 0.002])
    with torch.no_grad():
        out = src.student.G(x, t, t, _cond(src, 3), torch.tensor([0.0, 3.0, 5.0]))
    assert torch.equal(out, x)  # METHOD §2: G(x, t, t) = x


def test_c_skip_goes_to_one_at_sigma_min(tiny_source):
    t = torch.logspace(math.log10(80.0), math.log10(EDM.sigma_min), 50)
    cs = edm.c_skip(t, EDM.sigma_data)
    assert bool((cs[1:] > cs[:-1]).all())  # increases as t falls
    assert 1.0 - float(cs[-1]) < 2e-5 and float(edm.c_out(t, EDM.sigma_data)[-1]) < 1.01 * EDM.sigma_min
    # so g(x, σ_min, σ_min) ≈ x whatever the network says: the boundary condition of the consistency map
    src = tiny_source
    c, T = _shape(src)
    x = torch.randn(2, c, T)
    s = torch.full((2,), EDM.sigma_min)
    with torch.no_grad():
        g = src.student.g(x, s, s, _cond(src, 2), torch.full((2,), 3.0))
    assert float((g - x).abs().max()) < 0.01


def test_student_starts_as_an_exact_copy_of_the_teacher(teacher, tiny_source):
    student = ctm.student_from_teacher(teacher)
    assert all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    c, T = _shape(tiny_source)
    x = torch.randn(4, c, T) * 3
    t = torch.tensor([80.0, 5.0, 0.3, 0.002])
    cond = _cond(tiny_source, 4)
    with torch.no_grad():
        g = student.g(x, t, t, cond, torch.zeros(4))
        D = teacher.D(x, t, cond)
    assert torch.equal(g, D)  # METHOD §2: bit for bit at ω = 0
    for a, b in zip(student.parameters(), teacher.parameters(), strict=True):
        assert a.data_ptr() != b.data_ptr()  # a copy, not shared storage


# ------------------------------------------------------------------------------------- the teacher solver


def _gaussian_denoiser(sigma_d: float):
    """The ideal denoiser of data ~ N(0, σ_d² I): D(x, t) = σ_d²/(σ_d² + t²)·x."""

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (sigma_d**2 / (sigma_d**2 + t**2))[:, None, None] * x

    return denoise


def _exact(x: torch.Tensor, t: torch.Tensor, u: torch.Tensor, sigma_d: float) -> torch.Tensor:
    """PF-ODE dx/dt = (x − D)/t = x·t/(σ_d² + t²) -> x(u) = x(t)·√((σ_d² + u²)/(σ_d² + t²))."""
    return x * torch.sqrt((sigma_d**2 + u**2) / (sigma_d**2 + t**2))[:, None, None]


def test_heun_solver_matches_the_gaussian_closed_form():
    sd = 0.5
    N = 40
    grid = ctm.grid_sigmas(N, EDM).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64) * 80
    i_t = torch.tensor([0, 3, 10, 20, 30])
    n = 9
    got = ctm.teacher_solve(_gaussian_denoiser(sd), x, grid, i_t, n)
    want = _exact(x, grid[i_t], grid[i_t + n], sd)
    rel = ((got - want).abs() / want.abs()).max()
    assert float(rel) < 1e-2  # worst where t crosses σ_d (curvature), ~1e-5 elsewhere
    # second order: halving the step size (a grid twice as fine) cuts the error about 4x
    fine = ctm.grid_sigmas(2 * N - 1, EDM).double()
    got_f = ctm.teacher_solve(_gaussian_denoiser(sd), x, fine, 2 * i_t, 2 * n)
    rel_f = ((got_f - want).abs() / want.abs()).max()
    assert 3.5 < float(rel / rel_f) < 4.6


def test_heun_step_is_the_method_formula():
    sd = 0.5
    D = _gaussian_denoiser(sd)
    x = torch.randn(2, 1, 4, dtype=torch.float64)
    t, t1 = torch.tensor([2.0, 2.0], dtype=torch.float64), torch.tensor([1.0, 1.0], dtype=torch.float64)
    d = (x - D(x, t)) / 2.0  # METHOD §3.5 Euler
    xe = x + (1.0 - 2.0) * d
    d2 = (xe - D(xe, t1)) / 1.0
    torch.testing.assert_close(heun_step(D, x, t, t1), x + (1.0 - 2.0) * (d + d2) / 2)


def test_cfg_teacher_denoiser_is_per_example(teacher, tiny_source):
    c, T = _shape(tiny_source)
    cond, uncond = _cond(tiny_source, 3, 1), _cond(tiny_source, 3, 2)
    x = torch.randn(3, c, T)
    t = torch.tensor([10.0, 1.0, 0.1])
    w = torch.tensor([0.0, 1.0, 4.0])
    with torch.no_grad():
        got = ctm.cfg_teacher_denoiser(teacher, cond, uncond, w)(x, t)
        d_c, d_u = teacher.D(x, t, cond), teacher.D(x, t, uncond)
    want = d_u + w[:, None, None] * (d_c - d_u)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0], d_u[0], rtol=1e-5, atol=1e-5)  # ω = 0: unconditional
    torch.testing.assert_close(got[1], d_c[1], rtol=1e-5, atol=1e-5)  # ω = 1: conditional


# ------------------------------------------------------------------------------------------ the distance


def test_channel_normalisation_and_feature_distance():
    f = torch.randn(2, 7, 16)
    n = ctm.normalise_channels(f)
    torch.testing.assert_close(torch.linalg.vector_norm(n, dim=-1), torch.ones(2, 7))
    # invariant to a positive rescaling of each token's channel vector
    scale = torch.rand(2, 7, 1) + 0.1
    torch.testing.assert_close(ctm.feature_distance([f * scale], [f]), torch.zeros(2), atol=1e-6, rtol=0)
    # two blocks sum; each is the mean over non-batch dims of the squared difference of normalised features
    g = torch.randn(2, 7, 16)
    one = (ctm.normalise_channels(f) - ctm.normalise_channels(g)).pow(2).mean(dim=(1, 2))
    torch.testing.assert_close(ctm.feature_distance([f, g], [g, f]), 2 * one)
    assert ctm.normalise_channels(torch.zeros(1, 1, 4)).abs().sum() == 0  # the +1e-10 keeps zeros finite


def test_feature_distance_gradients_reach_x_est_only(teacher, tiny_source):
    c, T = _shape(tiny_source)
    cond = _cond(tiny_source, 2)
    s = torch.tensor([0.5, 0.02])
    x_est = torch.randn(2, c, T, requires_grad=True)
    x_tgt = torch.randn(2, c, T, requires_grad=True)
    with torch.no_grad():
        f_tgt = ctm.teacher_features(teacher, x_tgt, s, cond)
    feats = ctm.teacher_features(teacher, x_est, s, cond)
    assert len(feats) == tiny_source.config.dit.depth and feats[0].shape == (2, T, tiny_source.config.dit.width)
    ctm.feature_distance(feats, f_tgt).sum().backward()
    assert x_est.grad is not None and float(x_est.grad.abs().sum()) > 0
    assert x_tgt.grad is None
    assert all(p.grad is None for p in teacher.parameters())


# ------------------------------------------------------------------------------------ DSM and the weight


def test_dsm_loss_is_the_edm_formula(tiny_source):
    src = tiny_source
    c, T = _shape(src)
    x0, eps = torch.randn(3, c, T) * 0.5, torch.randn(3, c, T)
    sigma, w = torch.tensor([0.1, 1.0, 20.0]), torch.tensor([2.0, 3.0, 5.0])
    cond = _cond(src, 3)
    with torch.no_grad():
        got = ctm.dsm_loss(src.student, x0, sigma, eps, cond, w)
        x_s = x0 + sigma[:, None, None] * eps
        g = src.student.g(x_s, sigma, sigma, cond, w)
        weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2  # METHOD §3.8
        want = (weight * ((g - x0) ** 2).mean(dim=(1, 2))).mean()
    torch.testing.assert_close(got, want)


def test_adaptive_weight_ratio_clamp_and_detach():
    W = torch.randn(4, 3, requires_grad=True)
    a = (3.0 * W).sum()  # ∇ = 3·1
    b = (W**2).sum()  # ∇ = 2W
    lam = ctm.adaptive_weight(a, b, W)
    want = torch.linalg.vector_norm(torch.full((4, 3), 3.0)) / (torch.linalg.vector_norm(2 * W.detach()) + 1e-8)
    torch.testing.assert_close(lam, want)
    assert not lam.requires_grad
    tiny = 1e-9 * (W**2).sum()
    assert float(ctm.adaptive_weight(a, tiny, W)) == 1000.0  # clamp(·, 0, 1000)


def test_ctm_loss_module_both_distances(teacher, tiny_source):
    c, T = _shape(tiny_source)
    b = 3
    cond = _cond(tiny_source, b)
    grid = ctm.grid_sigmas(8, EDM)
    for distance in ctm.DISTANCES:
        student = ctm.student_from_teacher(teacher)
        mod = ctm.CTMLoss(student, teacher, distance, 0.2)
        assert not any(p is q for p in mod.parameters() for q in teacher.parameters())  # teacher not registered
        x0 = torch.randn(b, c, T) * 0.5
        t, s = grid[[0, 2, 4]], grid[[3, 5, 7]]
        x_t = x0 + t[:, None, None] * torch.randn(b, c, T)
        x_tgt = x_t * 0.5
        timer = ctm.PartTimer()
        loss, parts = mod(
            x_t,
            t,
            s,
            x_tgt,
            cond,
            torch.full((b,), 3.0),
            x0,
            torch.tensor([0.1, 1.0, 10.0]),
            torch.randn(b, c, T),
            timer,
        )
        assert torch.isfinite(loss) and 0 <= float(parts["lambda_adapt"]) <= 1000
        torch.testing.assert_close(loss.detach(), parts["loss_ctm"] + 0.2 * parts["lambda_adapt"] * parts["loss_dsm"])
        loss.backward()
        assert student.net.proj_out.weight.grad is not None
        assert {"student", "features", "dsm", "adaptive_weight"} <= set(timer.seconds)
