"""The CTM distillation loss of SoundCTM as small pure functions plus one thin module (METHOD §2-§3).

One iteration (METHOD §3): draw n with P(n) ∝ n, per example (t, u, s) on the N-point Karras grid and ω;
the frozen teacher runs n CFG-guided Heun steps from x_t at t to u; the EMA student θ⁻ jumps from u to s
(the target); the student jumps from t to s (the estimate); the two are compared at s with the teacher-feature
distance (or plain L2, the ablation); DSM on the student's own denoiser g(x, σ, σ) is added with the adaptive
weight on the last layer.

Every draw is a function of a torch.Generator passed in (train.loop.step_generator), so an iteration is
reproducible from (seed, step) alone.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .edm import append_dims, karras_sigmas
from .losses import edm_loss
from .models.config import EDMConfig
from .models.denoiser import Conditioning, CTMDenoiser
from .sampling import Denoise, heun_step, nu_guided

DISTANCES = ("teacher_features", "l2")
FEATURE_EPS = 1e-10  # METHOD §3.7: n(f) = f / (‖f‖₂ + 1e-10)
ADAPTIVE_EPS = 1e-8  # METHOD §3.9
ADAPTIVE_MAX = 1000.0  # METHOD §3.9: clamp(·, 0, 1000)


# ------------------------------------------------------------------------------------------------- draws


def sample_n(max_n: int, gen: torch.Generator) -> int:
    """Number of teacher solver steps n ∈ {1, …, max_n} with P(n) ∝ n, once per iteration.  # METHOD §3.2

    max_n = N − 1 is the method; a smaller max_n is the documented CPU-scale cap ([distill].max_n).
    """
    if max_n < 1:
        raise ValueError("max_n must be >= 1")
    weights = torch.arange(1, max_n + 1, dtype=torch.float64)
    return int(torch.multinomial(weights / weights.sum(), 1, generator=gen)) + 1


def sample_grid_indices(n: int, N: int, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: i_t uniform in {0, …, N−1−n}, i_s uniform in {i_t+n, …, N−1}. Returns (i_t, i_s) [B] long.

    METHOD §3.2 (k = 0 is σ_max, so t = t_{i_t} ≥ u = t_{i_t+n} ≥ s = t_{i_s}).
    """
    if not 1 <= n <= N - 1:
        raise ValueError(f"n = {n} must be in [1, N-1 = {N - 1}]")
    i_t = torch.floor(torch.rand(batch, generator=gen, dtype=torch.float64) * (N - n)).long()
    i_t = i_t.clamp(max=N - 1 - n)
    span = N - (i_t + n)  # number of admissible s indices, >= 1
    i_s = i_t + n + torch.floor(torch.rand(batch, generator=gen, dtype=torch.float64) * span).long()
    return i_t, torch.minimum(i_s, torch.full_like(i_s, N - 1))


def sample_omega(batch: int, omega_min: float, omega_max: float, gen: torch.Generator) -> torch.Tensor:
    """ω ~ U[ω_min, ω_max] per example [B].  # METHOD §3.3"""
    return omega_min + (omega_max - omega_min) * torch.rand(batch, generator=gen)


def sample_dsm_sigma(batch: int, edm: EDMConfig, r_max: float, gen: torch.Generator) -> torch.Tensor:
    """σ for DSM [B]: the first ⌈B/2⌉ with ln σ ~ N(p_mean, p_std²) (the teacher's training distribution,
    EDM's N(−1.2, 1.2²) by default), the rest on the Karras curve with r ~ U[0, r_max] (r = 0 is σ_max).
    # METHOD §3.8"""
    n_ln = (batch + 1) // 2
    ln_sigma = torch.exp(edm.p_mean + edm.p_std * torch.randn(n_ln, generator=gen))
    r = r_max * torch.rand(batch - n_ln, generator=gen)
    inv_rho = 1.0 / edm.rho
    # METHOD §1 Karras curve, continuous in r: (σ_max^(1/ρ) + r·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ
    karras = (edm.sigma_max**inv_rho + r * (edm.sigma_min**inv_rho - edm.sigma_max**inv_rho)) ** edm.rho
    return torch.cat([ln_sigma, karras])


# ---------------------------------------------------------------------------------------- teacher target


def cfg_teacher_denoiser(
    teacher: CTMDenoiser, cond: Conditioning, uncond: Conditioning, omega: torch.Tensor
) -> Denoise:
    """Per-example CFG teacher D_ω(x, τ) = D(x,τ,"") + ω·(D(x,τ,c) − D(x,τ,"")), one doubled batch.

    METHOD §3.5. cond, uncond: batch-B conditionings; omega [B]. (sampling.cfg_denoiser is the batch-1,
    scalar-ω form used for sampling.)
    """

    def denoise(x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        d = teacher.D(torch.cat([x, x]), torch.cat([tau, tau]), uncond.cat(cond))
        d_u, d_c = d.chunk(2)
        return d_u + append_dims(omega, x.ndim) * (d_c - d_u)  # METHOD §3.5

    return denoise


def teacher_solve(denoise: Denoise, x_t: torch.Tensor, grid: torch.Tensor, i_t: torch.Tensor, n: int) -> torch.Tensor:
    """n Heun steps on the grid from t = grid[i_t] to u = grid[i_t + n], per example. x_t [B, C, T].  # METHOD §3.5"""
    x = x_t
    for k in range(n):
        x = heun_step(denoise, x, grid[i_t + k], grid[i_t + k + 1])
    return x


# --------------------------------------------------------------------------------------------- distances


def normalise_channels(f: torch.Tensor) -> torch.Tensor:
    """n(f) = f / (‖f‖₂ over the channel axis + 1e-10); f [B, T, D] with channels last.  # METHOD §3.7"""
    return f / (torch.linalg.vector_norm(f, dim=-1, keepdim=True) + FEATURE_EPS)


def feature_distance(feats_est: list[torch.Tensor], feats_tgt: list[torch.Tensor]) -> torch.Tensor:
    """d = Σ_l mean_{non-batch dims} (n(f_l(x_est)) − n(f_l(x_tgt)))², per example [B].  # METHOD §3.7"""
    d = feats_est[0].new_zeros(feats_est[0].shape[0])
    for fe, ft in zip(feats_est, feats_tgt, strict=True):
        d = d + (normalise_channels(fe) - normalise_channels(ft)).pow(2).flatten(1).mean(dim=1)
    return d


def l2_distance(x_est: torch.Tensor, x_tgt: torch.Tensor) -> torch.Tensor:
    """Plain squared L2, mean over non-batch dims, per example [B] (the ablation of METHOD §7)."""
    return (x_est - x_tgt).pow(2).flatten(1).mean(dim=1)


def teacher_features(teacher: CTMDenoiser, x: torch.Tensor, s: torch.Tensor, cond: Conditioning) -> list[torch.Tensor]:
    """Block outputs [B, T, D] of the frozen teacher on c_in(s)·x at noise level s, same caption, no CFG.

    METHOD §3.7. We use the *sequential* hidden states (each block's output, fed to the next block) and
    normalise over the *channel* axis, as METHOD says — unlike the DiT release, which normalises over the
    sequence axis and feeds every block the same input. teacher.g applies c_in(s) to x itself.
    """
    _, feats = teacher.g(x, s, s, cond, torch.zeros_like(s), return_features=True)
    return feats


# ------------------------------------------------------------------------------------------ DSM, weights


def dsm_loss(
    student: CTMDenoiser,
    x0: torch.Tensor,
    sigma: torch.Tensor,
    eps: torch.Tensor,
    cond: Conditioning,
    omega: torch.Tensor,
) -> torch.Tensor:
    """L_DSM = mean(w(σ)·(g_θ(x_σ, σ, σ; c, ω) − x_0)²), w(σ) = (σ² + σ_d²)/(σ·σ_d)². Scalar.  # METHOD §3.8"""
    return edm_loss(lambda x, sg: student.g(x, sg, sg, cond, omega), x0, sigma, eps, student.sigma_data)


def adaptive_weight(loss_ctm: torch.Tensor, loss_dsm: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """λ_adapt = clamp(‖∇_W L_CTM‖ / (‖∇_W L_DSM‖ + 1e-8), 0, 1000), detached.  # METHOD §3.9"""
    (g_ctm,) = torch.autograd.grad(loss_ctm, W, retain_graph=True)
    (g_dsm,) = torch.autograd.grad(loss_dsm, W, retain_graph=True)
    lam = torch.linalg.vector_norm(g_ctm) / (torch.linalg.vector_norm(g_dsm) + ADAPTIVE_EPS)
    return lam.clamp(0.0, ADAPTIVE_MAX).detach()


# ------------------------------------------------------------------------------------------------ timing


class PartTimer:
    """Wall-clock seconds per named part of an iteration (synchronising CUDA when it is used)."""

    def __init__(self, enabled: bool = True, cuda: bool = False) -> None:
        self.enabled, self.cuda = enabled, cuda
        self.seconds: dict[str, float] = {}

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


# ------------------------------------------------------------------------------------------ the wrapper


class CTMLoss(nn.Module):
    """The student's part of one iteration as a module (so DistributedDataParallel sees the forward pass).

    Only the student is registered; the frozen teacher is held outside the module tree so that DDP neither
    broadcasts nor tracks it. The target x_tgt (teacher solver + EMA jump) is computed outside, no grad.
    """

    def __init__(self, student: CTMDenoiser, teacher: CTMDenoiser, distance: str, lambda_dsm: float) -> None:
        super().__init__()
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, not {distance!r}")
        self.student = student
        self._frozen = (teacher,)  # a tuple: not a registered submodule
        self.distance = distance
        self.lambda_dsm = lambda_dsm

    @property
    def teacher(self) -> CTMDenoiser:
        return self._frozen[0]

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        s: torch.Tensor,
        x_tgt: torch.Tensor,
        cond: Conditioning,
        omega: torch.Tensor,
        x0: torch.Tensor,
        sigma_dsm: torch.Tensor,
        eps_dsm: torch.Tensor,
        timer: PartTimer | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x_t, x_tgt, x0, eps_dsm [B, C, T]; t, s, omega, sigma_dsm [B]. Returns (L, detached parts)."""
        timer = timer or PartTimer(enabled=False)
        with timer.part("student"):
            x_est = self.student.G(x_t, t, s, cond, omega)  # METHOD §3.4, with gradients
        with timer.part("features"):
            if self.distance == "teacher_features":
                with torch.no_grad():
                    f_tgt = teacher_features(self.teacher, x_tgt, s, cond)
                d = feature_distance(teacher_features(self.teacher, x_est, s, cond), f_tgt)  # METHOD §3.7
            else:
                d = l2_distance(x_est, x_tgt)
            loss_ctm = d.mean()
        with timer.part("dsm"):
            loss_dsm = dsm_loss(self.student, x0, sigma_dsm, eps_dsm, cond, omega)  # METHOD §3.8
        with timer.part("adaptive_weight"):
            # under DDP this is this rank's λ (its rows' gradients at W), as in the releases
            lam = adaptive_weight(loss_ctm, loss_dsm, self.student.net.proj_out.weight)  # METHOD §3.9
        loss = loss_ctm + self.lambda_dsm * lam * loss_dsm  # METHOD §3.9
        parts = {"loss_ctm": loss_ctm.detach(), "loss_dsm": loss_dsm.detach(), "lambda_adapt": lam}
        return loss, parts


def student_from_teacher(teacher: CTMDenoiser) -> CTMDenoiser:
    """A trainable student with the teacher's weights, parameter by parameter (METHOD §2)."""
    student = copy.deepcopy(teacher)
    student.net.load_state_dict(teacher.net.state_dict())
    for p in student.parameters():
        p.requires_grad_(True)
    return student.train()


def student_denoiser(
    student: CTMDenoiser, cond: Conditioning, uncond: Conditioning, omega: float, nu: float = 1.0
) -> Denoise:
    """The student's own denoiser g_θ(x, t, t; c, ω) for Heun ODE sampling (METHOD §2, §4), with the same
    ν-guidance as the jumps: g_ν = g("") + ν·(g(c) − g("")); ν = 1 skips the unconditional pass.
    cond, uncond: batch-1 conditionings."""

    g_nu = nu_guided(student.g, cond, uncond, omega, nu)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return g_nu(x, t, t)

    return denoise


def expected_teacher_passes(max_n: int) -> float:
    """E[2n] denoiser evaluations (each on a doubled batch) of the Heun solver under P(n) ∝ n on 1..max_n."""
    n = torch.arange(1, max_n + 1, dtype=torch.float64)
    return float(2.0 * (n * n).sum() / n.sum())


def grid_sigmas(N: int, edm: EDMConfig) -> torch.Tensor:
    """The N-point Karras training grid (METHOD §1), k = 0 is σ_max."""
    return karras_sigmas(N, edm.sigma_min, edm.sigma_max, edm.rho)
