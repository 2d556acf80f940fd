"""Output level: a take's level set from its mel code before decoding, and a stateless soft limiter, so no take
is ever written or played beyond full scale.

Level (mel latent only). Every training clip is peak-normalised to −1 dBFS at `train prepare`, so that is the
level the data implies for any prompt; but a generated code can sit far outside the training range (the mel
teacher's takes decoded at a median +11 dBFS peak and up to +31, hi-hats the loudest, and now and then one near
silence), and a limiter alone would turn +20 dB into distortion. So before decoding, the code is shifted by a
constant (a gain: the decoder is linear in magnitude) that puts the take's *predicted* decoded peak at −1 dBFS.
The prediction reads the code only (so the streamed and the whole-take decode get the same gain, and audio can
still leave before the clip is decoded): the loudest frame's L2 norm of the linear magnitudes that the decoder
reconstructs, plus an offset measured on real clips (`PEAK_OFFSET_DB`). Its error is about ±3 dB (one standard
deviation), so the soft limiter below still catches what lands above its knee. A boost is capped at
`MAX_BOOST_DB`: a near-silent take is a model failure, not something to raise by 70 dB.

Below `knee` (0.9, −0.9 dBFS) samples pass unchanged; above it y = knee + h·tanh((|x| − knee)/h) with
h = CEILING − knee, which is continuous with slope 1 at the knee and never exceeds CEILING (0.999: float32
rounds tanh to 1 for large inputs, and a 16-bit file must not clip). It works sample by sample, so a streamed
take and the same take generated whole are limited identically.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .melcode import MelDecoder

KNEE = 0.9
CEILING = 0.999

TARGET_PEAK_DBFS = -1.0  # `train prepare` peak-normalises every clip to this
MAX_BOOST_DB = 30.0
# Decoded peak (dBFS) − (max-frame L2 of the linear magnitudes in dB − 20·log10(n_fft)); for a windowed frame that
# L2 grows as n_fft times the frame's RMS, hence the n_fft term. Measured with the shipped decoder (n_fft 2048,
# hop 512, 8 fast Griffin-Lim iterations) on 229 training clips peak-normalised to −1 dBFS: mean −48.05 dB
# before the n_fft term, standard deviation 3.05 dB (`level_calibration` in train/; a slow test re-measures it).
PEAK_OFFSET_DB = 18.18


def predicted_peak_dbfs(decoder: MelDecoder, logmel: np.ndarray) -> np.ndarray:
    """Un-normalised log-mel codes [B, M, T] -> each one's predicted decoded peak in dBFS [B] (no decoding)."""
    c = decoder.cfg
    mag = decoder.linear_magnitude(logmel, 0, logmel.shape[-1] * c.hop // c.syn_hop)  # [B, K, F], the clip's frames
    l2 = np.sqrt(np.einsum("bkf,bkf->bk", mag, mag, dtype=np.float64).max(axis=1))
    return 20 * np.log10(np.maximum(l2, 1e-12)) - 20 * math.log10(c.n_fft) + PEAK_OFFSET_DB


def level_shift(decoder: MelDecoder, logmel: np.ndarray, target_dbfs: float = TARGET_PEAK_DBFS) -> np.ndarray:
    """The constant to add to each code [B, M, T] (in nats of the log-mel, float32 [B]) that moves its predicted
    decoded peak to `target_dbfs`, a boost capped at MAX_BOOST_DB."""
    gain_db = np.minimum(target_dbfs - predicted_peak_dbfs(decoder, logmel), MAX_BOOST_DB)
    return (gain_db * math.log(10) / 20).astype(np.float32)


def normalise_level(decoder: MelDecoder, logmel: np.ndarray) -> np.ndarray:
    """Codes [B, M, T] -> the same codes at the target level (a new array)."""
    return logmel + level_shift(decoder, logmel)[:, None, None]


def soft_limit(audio: np.ndarray, knee: float = KNEE) -> np.ndarray:
    """float32 audio of any shape -> the same, |y| <= CEILING (in place on a float32 array; returns it)."""
    a = np.asarray(audio, dtype=np.float32)
    over = np.abs(a) > knee
    if over.any():
        x = a[over]
        head = CEILING - knee
        a[over] = np.sign(x) * (knee + head * np.tanh((np.abs(x) - knee) / head))
    return a
