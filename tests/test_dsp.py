"""The exportable signal processing: matmul inverse FFT, overlap-add, and the streaming-exact decoder."""

import numpy as np
import pytest
import torch

from soundctm_rt.train.models.config import VAEConfig
from soundctm_rt.train.models.dsp import HANN_OLA_GAIN, InverseRFFT, hann, overlap_add_valid
from soundctm_rt.train.models.vae import VAE, pad_context


@pytest.mark.parametrize("n", [8, 64, 512, 2048])
def test_inverse_rfft_matches_numpy(n):
    rng = np.random.default_rng(n)
    X = rng.standard_normal((3, 5, n // 2 + 1)) + 1j * rng.standard_normal((3, 5, n // 2 + 1))
    got = InverseRFFT(n)(torch.tensor(X.real, dtype=torch.float32), torch.tensor(X.imag, dtype=torch.float32))
    ref = np.fft.irfft(X, n=n)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-6 * max(1.0, np.abs(ref).max()))


def test_stft_overlap_add_roundtrip():
    """torch.stft (centre framing) then our iSTFT reconstructs the fully covered samples."""
    hop, n = 128, 512
    x = torch.randn(1, hop * 20)
    X = torch.stft(x, n, hop, window=hann(n), center=True, return_complex=True)
    frames = torch.fft.irfft(X.transpose(1, 2), n=n) * hann(n)
    y = overlap_add_valid(frames, hop) / HANN_OLA_GAIN
    # valid output starts at sample hop (segment 3 counted from frame 0's start at -2·hop)
    np.testing.assert_allclose(y[0].numpy(), x[0, hop : hop + y.shape[1]].numpy(), atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 4])
def test_streaming_decode_equals_full_decode(chunk):
    cfg = VAEConfig(latent_channels=4, width=16, encoder_blocks=1, decoder_blocks=2, n_fft=256, hop=64)
    torch.manual_seed(0)
    vae = VAE(cfg).eval()
    z = torch.randn(1, 4, 12)
    with torch.no_grad():
        full = vae.decode(z)
        R = cfg.decoder_context
        T = z.shape[-1]
        n = -(-T // chunk)
        zp = pad_context(z, R)
        zp = torch.cat([zp, zp[..., -1:].expand(-1, -1, n * chunk - T)], -1)
        parts = [vae.decoder(zp[..., i * chunk : i * chunk + chunk + 2 * R]) for i in range(n)]
    stream = torch.cat(parts, -1)[:, : full.shape[-1]]
    assert full.shape[-1] == T * cfg.latent_hop
    torch.testing.assert_close(stream, full, rtol=0, atol=1e-6)


def test_encoder_frame_count():
    cfg = VAEConfig(latent_channels=4, width=16, encoder_blocks=1, decoder_blocks=1, n_fft=256, hop=64)
    vae = VAE(cfg)
    mean, logvar = vae.encode(torch.randn(2, 10 * cfg.latent_hop))
    assert mean.shape == (2, 4, 10) and logvar.shape == (2, 4, 10)
