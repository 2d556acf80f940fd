"""γ-sampling on the host in numpy (METHOD §4): any step count, stoppable between steps.

It mirrors the fused graphs and train/sampling.py's torch reference; the arithmetic is float32 in the same
order, so the three agree to float rounding for the same noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Jump = Callable[[np.ndarray, float, float], np.ndarray]  # (x [1, C, T], t, s) -> x_s


class Stopped(Exception):
    """Sampling was asked to stop between steps."""


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float) -> np.ndarray:
    """n Karras points from sigma_max down to sigma_min, float32.  # METHOD §1"""
    if n < 2:
        raise ValueError("a Karras grid needs at least 2 points")
    k = np.arange(n, dtype=np.float64)
    inv = 1.0 / rho
    return ((sigma_max**inv + k / (n - 1) * (sigma_min**inv - sigma_max**inv)) ** rho).astype(np.float32)


def gamma_s(sigma_next: np.float32, gamma: float, sigma_min: float) -> np.float32:
    """s_i = sqrt(1 - γ²)·(σ_{i+1} - σ_min) + σ_min, in float32.  # METHOD §4"""
    g = np.float32(gamma)
    return np.float32(
        np.sqrt(np.float32(1.0) - g * g) * (np.float32(sigma_next) - np.float32(sigma_min)) + np.float32(sigma_min)
    )


def sample_gamma(
    jump: Jump,
    eps_T: np.ndarray,
    sigmas: np.ndarray,
    gamma: float,
    noises: Sequence[np.ndarray],
    sigma_min: float,
    on_step: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> np.ndarray:
    """γ-sampling from standard-normal eps_T [1, C, T]; noises[i] is ε_i for steps i < steps - 1.

    on_step(i) is called after each jump (timing); should_stop() is polled between steps (raises Stopped).
    """
    steps = len(sigmas) - 1
    if len(noises) < steps - 1:
        raise ValueError(f"{steps} steps need {steps - 1} noise arrays, got {len(noises)}")
    x = (sigmas[0] * eps_T).astype(np.float32)
    for i in range(steps):
        s = gamma_s(sigmas[i + 1], gamma, sigma_min)
        x = jump(x, float(sigmas[i]), float(s))
        if on_step is not None:
            on_step(i)
        if i < steps - 1:
            if should_stop is not None and should_stop():
                raise Stopped()
            x = x + np.sqrt(sigmas[i + 1] ** 2 - s**2, dtype=np.float32) * noises[i]
    return x


def draw_noise(seed: int, shape: tuple[int, ...], steps: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """All the noise of one generation from one seed: ε_T first, then ε_0..ε_{steps-2}.

    ε_T does not depend on the step count, so a take auditioned at 1 step keeps its content when re-rendered
    with more γ = 0 steps (METHOD §4).
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    eps_T = rng.standard_normal(shape, dtype=np.float32)
    noises = [rng.standard_normal(shape, dtype=np.float32) for _ in range(steps - 1)]
    return eps_T, noises


def nu_guided(x_u: np.ndarray, x_c: np.ndarray, nu: float) -> np.ndarray:
    """G_ν = G_u + ν·(G_c - G_u).  # METHOD §4"""
    return x_u + np.float32(nu) * (x_c - x_u)
