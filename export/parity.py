"""The export parity gate: torch vs onnxruntime vs OpenVINO on fixed inputs, tolerances stated (STYLE rule 5)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


class ParityError(RuntimeError):
    """A backend's output differs from torch beyond the stated tolerance; the export is refused."""


def snr_db(ref: np.ndarray, got: np.ndarray) -> float:
    """10·log10(‖ref‖² / ‖ref - got‖²); +inf when identical."""
    err = float(np.sum((ref.astype(np.float64) - got.astype(np.float64)) ** 2))
    sig = float(np.sum(ref.astype(np.float64) ** 2))
    if err == 0.0:
        return math.inf
    return 10.0 * math.log10(max(sig, 1e-30) / err)


def compare(
    graph: str,
    backend: str,
    ref: list[np.ndarray],
    got: list[np.ndarray],
    names: list[str],
    min_snr_db: float,
) -> dict[str, Any]:
    """Per-output max abs error and SNR; raises ParityError below min_snr_db or on a shape mismatch."""
    result: dict[str, Any] = {}
    for name, r, g in zip(names, ref, got, strict=True):
        if r.shape != g.shape:
            raise ParityError(f"{graph} on {backend}: output {name} has shape {g.shape}, torch gives {r.shape}")
        if not np.all(np.isfinite(g)):
            raise ParityError(f"{graph} on {backend}: output {name} is not finite")
        s = snr_db(r, g)
        result[name] = {
            "max_abs": float(np.max(np.abs(r - g))) if r.size else 0.0,
            "snr_db": round(s, 2) if math.isfinite(s) else "inf",
        }
        if s < min_snr_db:
            raise ParityError(
                f"{graph} on {backend}: output {name} SNR {s:.1f} dB < {min_snr_db} dB "
                f"(max abs error {result[name]['max_abs']:.3g}); export refused"
            )
    return result
