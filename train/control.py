"""Training-free intensity control through the differentiable CTM jump (METHOD §6).

Intensity (what is controlled and measured): frame-level loudness of the decoded waveform y [B, N] in dBFS,
one frame per latent frame (L = latent hop samples, ~43 Hz):

    I_j = 10·log10( Σ_n w[n]·y[jL − ⌊L/2⌋ + n]² / Σ_n w[n]·1[sample in the clip] + ε ),  n = 0 .. 2L-1

w a periodic Hann window of 2L samples centred on latent frame j's own samples [jL, (j+1)L); samples outside
the clip count as missing (the denominator keeps only the window weight inside), so the edge frames are not
biased low. It is 20·log10 of the Hann-weighted frame RMS relative to full scale (a full-scale sine reads
-3 dB); ε = 1e-8 is a soft floor at -80 dB that keeps the logarithm and its gradient finite in silence.
The curve can be split into its level and its shape. With match_level the control loss takes the
mean squared dB error after removing its mean over the frames (the shape), and the result is then scaled by
that mean (`with_level`, at most ±30 dB): a gain is exact and free, so the generative part only has to move the
envelope, which changes the sound much less than reaching an absolute level through the latent does.
The control loss is the mean squared difference in dB to the target curve over the frames that count, plus
timbre_weight × the timbre anchor: the mean squared dB difference, over 64 mel bands, between the result's
long-term spectral shape (each band's share of the clip's energy: level- and envelope-free) and that of the
uncontrolled take from the same noise with the same step count (the take the user would have got; the
one-step and the 4-step takes of the mel student differ by 10 dB RMS in this profile). The anchor lets the
envelope move and keeps what the sound is: without it both methods reach the target curve by turning the
prompt's sound into whatever noise fits the curve.

With the mel code (METHOD §5b) the loss reads both the intensity and the timbre profile from the latent itself
(`loss_features`): no decode, and a gradient that does not pass through phase reconstruction. With a VAE latent
the loss decodes. METHOD §6 has both methods use the one-step map x̂_0 = G(x_t, t, σ_min); (b) does:
  (a) `optimise_noise`: Adam on the unit initial noise ε_T (x_T = σ_max·ε_T), loss on the decoded intensity
      of G(σ_max·ε_T, σ_max, σ_min), ε_T projected back to the sphere of radius √(C·T) after every step so it
      stays a typical Gaussian draw; then deterministic γ = 0 sampling from it (`sample_noise_optimised`).
      With noise_through_sampler (the default) the loss is taken on the output of that same n-step γ = 0
      sampler, not of the one-step map: the mel student's multi-step takes from noise optimised through the
      one-step map came out 27 dB louder than its one-step take (+4 dBFS mean against a -26 dB target, 8
      cases), so control at 4 steps was no better than a gain. At n = 1 the two are the same;
  (b) `sample_loss_guided`: γ-sampling where, before each jump, x_t is nudged along the negative gradient of
      the loss on the decode of x̂_0 = G(x_t, t, σ_min), with a normalised step of size ρ·t (scale-free: the
      move is a fixed fraction of the current noise level, so early steps shape the envelope, late ones only
      trim it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .checkpoint import ModelSource
from .edm import gamma_s, sampling_sigmas
from .latent import MelCodec
from .losses import mel_filterbank, stft_mag
from .models.denoiser import Conditioning
from .sampling import Jump, guided_jump, sample_gamma

INTENSITY_FLOOR_DB = -80.0
INTENSITY_EPS = 10.0 ** (INTENSITY_FLOOR_DB / 10.0)  # mean-square floor: 1e-8 = -80 dBFS


@dataclass(frozen=True)
class ControlConfig:
    """Settings of both control methods (saved with every report)."""

    # Defaults from `soundctm-rt eval-control` sweeps of the shipped student, which trade the curve's error against
    # keeping the prompt's sound (the figures: docs/experiments/control-defaults.md).
    # (a) noise optimisation: Adam on ε_T through the sampler of the asked step count (or the one-step map).
    noise_iterations: int = 30  # Adam steps (each one forward + backward through G and the decoder)
    noise_lr: float = 0.02  # Adam step size in units of the unit-variance noise ε_T
    noise_through_sampler: bool = True  # loss on the n-step γ = 0 take (False: METHOD §6's one-step map)
    # (b) loss guidance inside multi-step sampling.
    guidance_steps: int = 4  # sampling steps when none are asked for (guidance needs more than one)
    guidance_iterations: int = 4  # gradient nudges of x_t before each jump
    guidance_rho: float = 0.1  # nudge size: each element of x_t moves by ρ·t on average (RMS) per nudge
    guidance_min_t: float = 0.05  # no nudges below this noise level: x̂_0 ≈ x_t there and the decoder is the map
    guidance_max_t: float | None = None  # no nudges above this noise level (None: no limit)
    # Both: weight of the timbre anchor (module docstring) against the intensity loss, both in dB². 0 turns it off.
    timbre_weight: float = 30.0
    # Both: control only the curve's shape and set its level by a gain afterwards (module docstring); off, since
    # it misses the curve by more at no better adherence (docs/experiments/control-defaults.md).
    match_level: bool = False

    def __post_init__(self) -> None:
        if self.noise_iterations < 0 or self.guidance_iterations < 0:
            raise ValueError("control: iteration counts must be >= 0")
        if self.noise_lr <= 0 or self.guidance_rho <= 0 or self.guidance_min_t < 0 or self.timbre_weight < 0:
            raise ValueError("control: noise_lr and guidance_rho must be > 0, guidance_min_t and timbre_weight >= 0")
        if self.guidance_steps < 2:
            raise ValueError("control: guidance_steps must be >= 2 (loss guidance acts between steps)")


# ---------------------------------------------------------------------------------------------- intensity


def intensity_db(y: torch.Tensor, hop: int) -> torch.Tensor:
    """Frame loudness in dBFS (module docstring). y [B, N] waveform -> [B, N // hop] frames at sr/hop Hz."""
    frames = y.shape[-1] // hop
    w = torch.hann_window(2 * hop, periodic=True, dtype=y.dtype, device=y.device)[None, None]
    left, total = hop // 2, (frames + 1) * hop  # frame j's window: samples [jL - left, jL - left + 2L)

    def framed(v: torch.Tensor) -> torch.Tensor:  # [B, N] -> [B, 1, total], zeros outside the clip
        v = F.pad(v[:, None], (left, 0))[..., :total]
        return F.pad(v, (0, total - v.shape[-1]))

    ms = F.conv1d(framed(y**2), w, stride=hop) / F.conv1d(framed(torch.ones_like(y[:1])), w, stride=hop)
    return 10.0 * torch.log10(ms[:, 0] + INTENSITY_EPS)


MAX_LEVEL_GAIN_DB = 30.0  # with_level never scales by more than this: it sets a level, it does not rescue silence


def level_offset(level: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean dB by which the target lies above the level [B], over the frames that count."""
    d = target - level
    if mask is None:
        return d.mean(-1)
    m = mask.to(d.dtype).expand_as(d)
    return (d * m).sum(-1) / m.sum(-1).clamp(min=1.0)


def with_level(
    y: torch.Tensor, target: torch.Tensor, hop: int, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Waveform y [B, N] scaled so that its mean intensity meets the target's (±MAX_LEVEL_GAIN_DB); and the
    gains [B] in dB. Scaling by g dB adds g to every frame's intensity (above the -80 dB floor)."""
    g = level_offset(intensity_db(y, hop), target, mask).clamp(-MAX_LEVEL_GAIN_DB, MAX_LEVEL_GAIN_DB)
    return y * (10.0 ** (g / 20.0))[:, None], g


def intensity_loss(
    level: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, shape_only: bool = False
) -> torch.Tensor:
    """Mean squared dB error per example: level, target [B, T] dB; mask [T] or [B, T] of frames that count.
    shape_only: the error after removing its mean over those frames (what a gain cannot fix)."""
    err = level - target
    if shape_only:
        err = err + level_offset(level, target, mask)[:, None]
    err = err**2
    if mask is None:
        return err.mean(-1)
    m = mask.to(err.dtype).expand_as(err)
    return (err * m).sum(-1) / m.sum(-1).clamp(min=1.0)


TIMBRE_BANDS = 64
TIMBRE_FLOOR = 1e-6  # a band's energy share is floored at -60 dB: near-empty bands should not dominate the anchor


def timbre_profile(y: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """Long-term spectral shape [B, 64] in dB: each mel band's share of the clip's total energy. Independent of
    the overall level and of how the energy is spread over time, so it can anchor what a sound is while its
    intensity curve changes."""
    fb = mel_filterbank(sample_rate, 2048, TIMBRE_BANDS).to(y)
    energy = (fb @ stft_mag(y, 2048, 512) ** 2).sum(-1)
    share = energy / energy.sum(-1, keepdim=True).clamp(min=1e-20)
    return 10.0 * torch.log10(share + TIMBRE_FLOOR)


def control_loss(
    src: ModelSource,
    x0: torch.Tensor,
    target: torch.Tensor,
    cfg: ControlConfig,
    mask: torch.Tensor | None,
    anchor: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [B], intensity dB RMSE [B]) of a normalised latent x0: intensity loss (of the shape alone with
    match_level) + timbre_weight × anchor."""
    intensity, timbre_of = loss_features(src, x0)
    level = intensity_loss(intensity, target, mask, cfg.match_level)
    if anchor is None or cfg.timbre_weight == 0:
        return level, level.detach().sqrt()
    timbre = (timbre_of() - anchor).pow(2).mean(-1)
    return level + cfg.timbre_weight * timbre, level.detach().sqrt()


def loss_features(src: ModelSource, x0: torch.Tensor) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
    """(intensity [B, T] dB, a function giving the timbre profile) of a normalised latent, differentiable in x0.

    A mel code holds both without decoding (METHOD §5b): the frame RMS by Parseval from the mel, and the
    timbre profile as each mel band's share of the clip's energy. A VAE latent is decoded first.
    """
    if isinstance(src.codec, MelCodec):
        z = src.denormalise(x0)
        return src.codec.intensity_db(z), lambda: mel_timbre_profile(z)
    y = src.decode(x0)
    return intensity_db(y, src.config.latent_hop), lambda: timbre_profile(y, src.config.sample_rate)


def mel_timbre_profile(z: torch.Tensor) -> torch.Tensor:
    """timbre_profile of a log-mel [B, M, T]: each mel band's share of the clip's energy, in dB [B, M]."""
    energy = torch.exp(2.0 * z).sum(-1)  # the log floor's energy is ~1e-10 per bin: negligible here
    share = energy / energy.sum(-1, keepdim=True).clamp(min=1e-20)
    return 10.0 * torch.log10(share + TIMBRE_FLOOR)


def deterministic_take(src: ModelSource, jump: Jump, eps_T: torch.Tensor, steps: int) -> torch.Tensor:
    """γ = 0 sampling with `steps` steps from unit noise ε_T (differentiable in ε_T; no noise is added)."""
    e = src.config.edm
    sig = sampling_sigmas(steps, e)
    zeros = [torch.zeros_like(eps_T)] * (steps - 1)  # γ = 0: s_i = σ_{i+1}
    return sample_gamma(jump, sig[0] * eps_T, sig, 0.0, zeros, e.sigma_min)


def timbre_anchor(
    src: ModelSource, jump: Jump, eps_T: torch.Tensor, cfg: ControlConfig, steps: int = 1
) -> torch.Tensor | None:
    """The timbre profile of the uncontrolled γ = 0 take from ε_T with `steps` steps (None when the anchor is
    off)."""
    if cfg.timbre_weight == 0:
        return None
    with torch.no_grad():
        return loss_features(src, deterministic_take(src, jump, eps_T, steps))[1]()


def db_rmse(level: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """RMSE in dB per example [B] (the figure the report gives)."""
    return intensity_loss(level, target, mask).sqrt()


# ------------------------------------------------------------------------------------------------ plumbing


def decoded_intensity(src: ModelSource, x0: torch.Tensor) -> torch.Tensor:
    """[B, C, T] normalised latent -> intensity [B, T] dB of its decode."""
    return intensity_db(src.decode(x0), src.config.latent_hop)


def freeze(src: ModelSource) -> None:
    """No parameter gradients: control differentiates w.r.t. the sample only."""
    for m in (src.student, src.codec):
        for p in m.parameters():
            p.requires_grad_(False)


@dataclass
class ControlResult:
    """A controlled batch: final latent [B, C, T], the initial noise it came from, and what it cost."""

    x0: torch.Tensor
    eps_T: torch.Tensor
    seconds: float
    loss_trace: list[list[float]]  # per iteration (a) or nudge (b): the batch's dB RMSE on x̂_0


# --------------------------------------------------------------------------------- (a) noise optimisation


def optimise_noise(
    src: ModelSource,
    jump: Jump,
    eps_T: torch.Tensor,
    target: torch.Tensor,
    cfg: ControlConfig,
    mask: torch.Tensor | None = None,
    steps: int = 1,
) -> tuple[torch.Tensor, list[list[float]]]:
    """METHOD §6 (a): ε_T [B, C, T] unit noise -> optimised unit noise for γ = 0 sampling with `steps` steps,
    and the dB RMSE of the differentiated take at each iteration (the `steps`-step take with
    noise_through_sampler, else the one-step map's). target [B, T] dB. Adam on ε_T, projected to the √(C·T)
    sphere after each step."""
    n = steps if cfg.noise_through_sampler else 1
    radius = math.sqrt(eps_T[0].numel())
    anchor = timbre_anchor(src, jump, eps_T, cfg, steps)
    eps = eps_T.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([eps], lr=cfg.noise_lr)
    trace: list[list[float]] = []
    for _ in range(cfg.noise_iterations):
        loss, rmse = control_loss(src, deterministic_take(src, jump, eps, n), target, cfg, mask, anchor)
        trace.append(rmse.tolist())
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()  # examples are independent: the sum gives each its own gradient
        opt.step()
        with torch.no_grad():  # back onto the shell where N(0, I) draws live
            eps.mul_(radius / eps.flatten(1).norm(dim=1)[:, None, None])
    return eps.detach(), trace


def sample_noise_optimised(
    src: ModelSource,
    jump: Jump,
    eps_T: torch.Tensor,
    target: torch.Tensor,
    steps: int,
    cfg: ControlConfig,
    mask: torch.Tensor | None = None,
) -> ControlResult:
    """(a) end to end: optimise ε_T (through the `steps`-step sampler, or the one-step map), then γ = 0
    sampling with `steps` steps."""
    t0 = time.perf_counter()
    eps, trace = optimise_noise(src, jump, eps_T, target, cfg, mask, steps)
    with torch.no_grad():
        x0 = deterministic_take(src, jump, eps, steps)
    return ControlResult(x0, eps, time.perf_counter() - t0, trace)


# ------------------------------------------------------------------------------------- (b) loss guidance


def sample_loss_guided(
    src: ModelSource,
    jump: Jump,
    eps_T: torch.Tensor,
    noises: list[torch.Tensor],
    target: torch.Tensor,
    steps: int,
    gamma: float,
    cfg: ControlConfig,
    mask: torch.Tensor | None = None,
) -> ControlResult:
    """METHOD §6 (b): γ-sampling (METHOD §4) from x_T = σ_max·ε_T where, before each jump from t with
    t >= guidance_min_t, x_t takes `guidance_iterations` nudges x_t ← x_t − ρ·t·∇/rms(∇), ∇ the gradient of
    the loss on the decode of x̂_0 = G(x_t, t, σ_min). noises[i]: unit noise [B, C, T] of step i < steps-1."""
    t_start = time.perf_counter()
    e = src.config.edm
    sig = sampling_sigmas(steps, e)
    b = eps_T.shape[0]
    s_min = torch.full((b,), e.sigma_min)
    x = sig[0] * eps_T
    anchor = timbre_anchor(src, jump, eps_T, cfg, steps)
    trace: list[list[float]] = []
    for i in range(steps):
        t = sig[i].expand(b)
        if cfg.guidance_min_t <= float(sig[i]) and (cfg.guidance_max_t is None or float(sig[i]) <= cfg.guidance_max_t):
            for _ in range(cfg.guidance_iterations):
                x_t = x.detach().requires_grad_(True)
                loss, rmse = control_loss(src, jump(x_t, t, s_min), target, cfg, mask, anchor)
                trace.append(rmse.tolist())
                (grad,) = torch.autograd.grad(loss.sum(), x_t)
                rms = grad.flatten(1).pow(2).mean(1).sqrt().clamp(min=1e-20)[:, None, None]
                x = (x_t - cfg.guidance_rho * sig[i] * grad / rms).detach()
        with torch.no_grad():
            s = gamma_s(sig[i + 1], gamma, e.sigma_min).expand(b)
            x = jump(x, t, s)
            if i < steps - 1:
                x = x + torch.sqrt(sig[i + 1] ** 2 - s[0] ** 2) * noises[i]  # METHOD §4
    return ControlResult(x, eps_T, time.perf_counter() - t_start, trace)


def sample_uncontrolled(
    src: ModelSource, jump: Jump, eps_T: torch.Tensor, noises: list[torch.Tensor], steps: int, gamma: float
) -> ControlResult:
    """The same γ-sampling without control: the paired baseline of both methods."""
    t0 = time.perf_counter()
    e = src.config.edm
    sig = sampling_sigmas(steps, e)
    with torch.no_grad():
        x0 = sample_gamma(jump, sig[0] * eps_T, sig, gamma, noises[: steps - 1], e.sigma_min)
    return ControlResult(x0, eps_T, time.perf_counter() - t0, [])


def student_jump(src: ModelSource, cond: Conditioning, uncond: Conditioning, omega: float, nu: float) -> Jump:
    """G_ν of the student for a batch (train.sampling.guided_jump), with the model frozen."""
    freeze(src)
    return guided_jump(src.student, cond, uncond, omega, nu)
