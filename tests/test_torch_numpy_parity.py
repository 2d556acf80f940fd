"""The runtime's numpy host loop equals the torch γ-sampler (train/sampling.py) on the same noise."""

import numpy as np
import pytest
import torch

from soundctm_rt.engine import Engine
from soundctm_rt.sampling import draw_noise
from soundctm_rt.train.edm import sampling_sigmas
from soundctm_rt.train.models.denoiser import Conditioning
from soundctm_rt.train.models.text import load_tokenizer, tokenize
from soundctm_rt.train.sampling import guided_jump, sample_gamma


@pytest.mark.parametrize("steps, gamma, nu", [(1, 0.0, 1.0), (3, 0.0, 1.0), (3, 0.7, 1.0), (2, 1.0, 2.5)])
def test_numpy_host_loop_matches_torch(tiny_source, tiny_bundle, steps, gamma, nu):
    src = tiny_source
    cfg = src.config
    prompt, omega, seed = "Roland TR-808 snare drum", 4.0, 21
    tok = load_tokenizer(cfg.text.max_length)
    ids, mask = tokenize(tok, [prompt, ""])
    with torch.no_grad():
        tokens, pooled = src.text(ids, mask)
        cond = Conditioning(tokens[:1], mask[:1].float(), pooled[:1])
        uncond = Conditioning(tokens[1:], mask[1:].float(), pooled[1:])
        eps_T, noises = draw_noise(seed, (1, cfg.latent_channels, cfg.dit.latent_frames), steps)
        sig = sampling_sigmas(steps, cfg.edm)
        x_torch = sample_gamma(
            guided_jump(src.student, cond, uncond, omega, nu),
            sig[0] * torch.from_numpy(eps_T),
            sig,
            gamma,
            [torch.from_numpy(n) for n in noises],
            cfg.edm.sigma_min,
        ).numpy()
    eng = Engine(tiny_bundle, warmup=False)
    x_np = eng.sample_latent(prompt, seed=seed, steps=steps, gamma=gamma, omega=omega, nu=nu)
    np.testing.assert_allclose(x_np, x_torch, atol=1e-4 * np.abs(x_torch).max())
