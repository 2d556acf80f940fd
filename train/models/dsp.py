"""Exportable signal processing: STFT framing, a two-stage matmul inverse real FFT, and overlap-add.

The inverse FFT is written as matmuls (Cooley-Tukey with N = N1·N2) rather than torch.fft because OpenVINO
crashes on the ONNX DFT op's inverse form and a dense N×N basis costs 5× more arithmetic. Framing convention
shared by the encoder and the decoder: STFT frame k covers samples [(k - 2)·hop, (k + 2)·hop) (torch.stft with
center=True, n_fft = 4·hop), so latent frame j owns samples [j·L, (j+1)·L) with L = hop·downsample.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _split(n: int) -> tuple[int, int]:
    """N = N1·N2 with N1 <= N2 as close as possible (both powers of two for power-of-two N)."""
    n1 = 2 ** (int(math.log2(n)) // 2)
    if n % n1:
        raise ValueError(f"n_fft {n} must be a power of two")
    return n1, n // n1


class InverseRFFT(nn.Module):
    """irfft along the last axis: (re, im) [..., N/2+1] -> [..., N], matching numpy.fft.irfft."""

    c1: torch.Tensor  # buffers: the two DFT stages' cos/sin tables and the twiddles
    s1: torch.Tensor
    c2: torch.Tensor
    s2: torch.Tensor
    tc: torch.Tensor
    ts: torch.Tensor

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        n1, n2 = _split(n)
        self.n1, self.n2 = n1, n2
        k1 = torch.arange(n1, dtype=torch.float64)
        a1 = 2 * math.pi * torch.outer(k1, k1) / n1  # [k1, n1]
        k2 = torch.arange(n2, dtype=torch.float64)
        a2 = 2 * math.pi * torch.outer(k2, k2) / n2  # [k2, n2]
        tw = 2 * math.pi * torch.outer(torch.arange(n1, dtype=torch.float64), k2) / n  # [n1, k2]
        for name, val in {
            "c1": torch.cos(a1),
            "s1": torch.sin(a1),
            "c2": torch.cos(a2) / n,
            "s2": torch.sin(a2) / n,
            "tc": torch.cos(tw),
            "ts": torch.sin(tw),
        }.items():
            self.register_buffer(name, val.float(), persistent=False)

    def forward(self, re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
        n, n1, n2 = self.n, self.n1, self.n2
        # Hermitian completion: X[k] = conj(X[N-k]) for k > N/2; the imaginary parts of DC and Nyquist
        # are ignored, as numpy does.
        half = n // 2
        im = torch.cat([im[..., :1] * 0, im[..., 1:half], im[..., half:] * 0], dim=-1)
        re_full = torch.cat([re, re[..., 1:half].flip(-1)], dim=-1)
        im_full = torch.cat([im, -im[..., 1:half].flip(-1)], dim=-1)
        lead = re.shape[:-1]
        # X indexed k = N2·k1 + k2 -> [.., k1, k2]; stage 1: DFT over k1 (size N1) -> [.., n1, k2]
        xr = re_full.reshape(*lead, n1, n2)
        xi = im_full.reshape(*lead, n1, n2)
        c1t, s1t = self.c1.transpose(0, 1), self.s1.transpose(0, 1)  # [n1, k1]
        yr = c1t @ xr - s1t @ xi
        yi = s1t @ xr + c1t @ xi
        # twiddle e^{+2πi·n1·k2/N}
        zr = yr * self.tc - yi * self.ts
        zi = yr * self.ts + yi * self.tc
        # stage 2: DFT over k2 (size N2), real part only -> [.., n1, n2]; sample n = n1 + N1·n2
        out = zr @ self.c2 - zi @ self.s2
        return out.transpose(-1, -2).reshape(*lead, n)


def overlap_add_valid(frames: torch.Tensor, hop: int) -> torch.Tensor:
    """Overlap-add frames [B, F, 4·hop] (frame k starts at (k-2)·hop) and keep only fully covered samples.

    Returns [B, (F - 3)·hop]: the segments 1 .. F-3 (segment m = samples [m·hop, (m+1)·hop)), i.e. every
    sample that all four of its frames contributed to. Four shifted slices, no big identity kernel.
    """
    B, Fn, _ = frames.shape
    seg = frames.reshape(B, Fn, 4, hop)
    # segment m (relative to frame 0's start) receives frame m-r's part r, r = 0..3; valid m in [3, F-1]
    out = seg[:, 0 : Fn - 3, 3] + seg[:, 1 : Fn - 2, 2] + seg[:, 2 : Fn - 1, 1] + seg[:, 3:Fn, 0]
    return out.reshape(B, (Fn - 3) * hop)


def hann(n: int) -> torch.Tensor:
    """Periodic Hann window (the STFT and the iSTFT use the same)."""
    return torch.hann_window(n, periodic=True, dtype=torch.float32)


# Sum of squared periodic Hann windows at 4× overlap is constant: 1.5 (normalises the synthesis).
HANN_OLA_GAIN = 1.5
