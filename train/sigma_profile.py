"""Where along σ a teacher uses its caption: the denoising error of held-out clips per noise level, with the
true caption, the empty caption and a shuffled caption.

Why: the training distribution of σ (METHOD §3.8, EDM's ln σ ~ N(−1.2, 1.2²)) was tuned on images of a few
thousand dimensions. A code with many redundant dimensions (the 128 × 128 log-mel: 16 384 numbers that vary
smoothly across bins and frames) keeps its coarse structure — which sound it is — recognisable up to a far
higher σ, so that is where the caption must do its work. This report shows it: the σ where the error reaches
the code's variance is where the sound is decided, and `gain` (error without the caption / error with it) says
how much the caption helps there. A teacher whose gain stays near 1 everywhere ignores its prompt.

All errors are mean squared errors of D(x_σ; σ, c) against x₀ in the normalised code, divided by σ_data² (so
predicting the mean scores about 1), with one fixed noise draw per clip (comparable across teachers).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .checkpoint import ModelSource
from .conditioning import CaptionTable
from .data import ClipDataset
from .latent import normalise

SIGMAS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 80.0)


@torch.no_grad()
def sigma_profile(
    src: ModelSource,
    ds: ClipDataset,
    splits: tuple[str, ...] = ("valid", "test"),
    n_clips: int = 96,
    sigmas: tuple[float, ...] = SIGMAS,
    seed: int = 0,
    batch: int = 32,
) -> dict[str, Any]:
    """The report: one row per σ with `cond`, `empty`, `shuffled` errors and `gain` = empty / cond."""
    idx = np.concatenate([ds.indices(s) for s in splits])
    if len(idx) == 0:
        raise ValueError(f"sigma profile: the dataset has no clips in {splits}")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(idx, min(n_clips, len(idx)), replace=False))
    wav = torch.from_numpy(ds.wave(idx))
    hop = src.config.latent_hop
    frames = src.config.dit.latent_frames
    wav = wav[:, : frames * hop]
    z = torch.cat([src.codec.encode(wav[i : i + batch])[0] for i in range(0, len(idx), batch)])
    x0 = normalise(z, src.latent_mean.float(), src.latent_std.float())
    captions = [ds.captions[int(i)] for i in idx]
    table = CaptionTable(src.text, captions, src.config.text.max_length)
    rows = table.rows(captions)
    shuffled = rows[torch.from_numpy(rng.permutation(len(idx)))]
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    sd2 = src.student.sigma_data**2
    denoiser = src.student.eval()
    out = []
    for s in sigmas:
        row: dict[str, float] = {"sigma": s}
        for name, r in (("cond", rows), ("empty", torch.zeros_like(rows)), ("shuffled", shuffled)):
            err = 0.0
            for i in range(0, len(idx), batch):
                xt = x0[i : i + batch] + s * eps[i : i + batch]
                sig = torch.full((len(xt),), s)
                d = denoiser.D(xt, sig, table.cond(r[i : i + batch]))
                err += float(((d - x0[i : i + batch]) ** 2).sum())
            row[name] = err / x0.numel() / sd2
        row["gain"] = row["empty"] / row["cond"]
        out.append(row)
    return {
        "clips": len(idx),
        "splits": list(splits),
        "seed": seed,
        "code_variance": float(x0.var()) / sd2,
        "edm": {"p_mean": src.config.edm.p_mean, "p_std": src.config.edm.p_std},
        "rows": out,
    }


def format_profile(report: dict[str, Any]) -> str:
    """The report as a Markdown table."""
    lines = [
        f"{report['clips']} held-out clips ({', '.join(report['splits'])}); error = MSE / σ_data² "
        f"(the code's variance is {report['code_variance']:.3f}); gain = empty / cond.",
        "",
        "| σ | cond | empty | shuffled | gain |",
        "|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['sigma']:g} | {r['cond']:.4f} | {r['empty']:.4f} | {r['shuffled']:.4f} | {r['gain']:.3f} |")
    return "\n".join(lines)
