"""Calibrate the runtime's level setting (soundctm_rt/level.py) on real clips: how far the decoded peak of a real
clip's mel code lies from the peak that `predicted_peak_dbfs` reads off the code.

The training clips are all peak-normalised (`[data] peak_db`, −1 dBFS), so encoding them with the fixed mel code
and decoding them back measures the decoder's own overshoot (Griffin-Lim's phases add a few dB of peak) together
with the predictor's error. `offset_db` is the value of level.PEAK_OFFSET_DB that would make the mean error zero
on these clips; the shipped constant was set from this report (`soundctm-rt train level-calibration`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from soundctm_rt.level import PEAK_OFFSET_DB, predicted_peak_dbfs
from soundctm_rt.melcode import MelCodeConfig, MelDecoder, log_mel

from .data import ClipDataset


def _db(x: np.ndarray) -> np.ndarray:
    return 20 * np.log10(np.maximum(x, 1e-12))


def level_calibration(ds: ClipDataset, cfg: MelCodeConfig, n_clips: int = 229, split: str = "train") -> dict[str, Any]:
    """Encode and decode `n_clips` clips of a split (evenly spaced); the report is JSON-ready."""
    idx = ds.indices(split)
    if len(idx) == 0:
        raise ValueError(f"the dataset has no {split!r} clips")
    idx = idx[np.unique(np.linspace(0, len(idx) - 1, min(n_clips, len(idx))).round().astype(int))]
    dec = MelDecoder(cfg)
    src, out, pred = [], [], []
    for i in range(0, len(idx), 16):
        wav = ds.wave(idx[i : i + 16])
        z = log_mel(wav, cfg)
        src.append(_db(np.abs(wav).max(-1)))
        out.append(_db(np.abs(dec.decode(z)).max(-1)))
        pred.append(predicted_peak_dbfs(dec, z))
    peak_in, peak_out, peak_pred = (np.concatenate(v) for v in (src, out, pred))
    err = peak_out - peak_pred

    def pct(v: np.ndarray) -> dict[str, float]:
        return {k: round(float(np.percentile(v, q)), 2) for k, q in (("p5", 5), ("median", 50), ("p95", 95))}

    return {
        "split": split,
        "clips": len(idx),
        "source_peak_dbfs": pct(peak_in),
        "decoded_peak_dbfs": pct(peak_out),
        "error_db": {"mean": round(float(err.mean()), 2), "std": round(float(err.std()), 2), **pct(err)},
        "peak_offset_db": PEAK_OFFSET_DB,
        "offset_db": round(PEAK_OFFSET_DB + float(err.mean()), 2),
        "code": cfg.to_dict(),
    }


def format_calibration(r: dict[str, Any]) -> str:
    e, d, s = r["error_db"], r["decoded_peak_dbfs"], r["source_peak_dbfs"]
    return (
        f"{r['clips']} {r['split']} clips: source peak median {s['median']} dBFS, decoded peak median "
        f"{d['median']} dBFS [p5 {d['p5']}, p95 {d['p95']}]\n"
        f"decoded − predicted peak: mean {e['mean']} dB, sd {e['std']} dB [p5 {e['p5']}, p95 {e['p95']}]\n"
        f"PEAK_OFFSET_DB is {r['peak_offset_db']}; these clips say {r['offset_db']}"
    )
