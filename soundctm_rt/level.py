"""Output level safety: a stateless soft limiter, so no take is ever written or played beyond full scale.

Below `knee` (0.9, −0.9 dBFS) samples pass unchanged; above it y = knee + h·tanh((|x| − knee)/h) with
h = CEILING − knee, which is continuous with slope 1 at the knee and never exceeds CEILING (0.999: float32
rounds tanh to 1 for large inputs, and a 16-bit file must not clip). It works sample by sample, so a streamed
take and the same take generated whole are limited identically.
"""

from __future__ import annotations

import numpy as np

KNEE = 0.9
CEILING = 0.999


def soft_limit(audio: np.ndarray, knee: float = KNEE) -> np.ndarray:
    """float32 audio of any shape -> the same, |y| <= CEILING (in place on a float32 array; returns it)."""
    a = np.asarray(audio, dtype=np.float32)
    over = np.abs(a) > knee
    if over.any():
        x = a[over]
        head = CEILING - knee
        a[over] = np.sign(x) * (knee + head * np.tanh((np.abs(x) - knee) / head))
    return a
