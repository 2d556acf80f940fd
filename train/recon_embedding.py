"""Reconstructions judged in the evaluation embedding: the adoption test of ../shared/data/README.md.

The data README adopts a learned VAE only when its reconstructions beat the no-training baselines on KID and
linear-probe accuracy in the evaluation embedding (BirdNET). This module measures exactly that, beside the
signal metrics of report.py:
  * each method reconstructs the test clips;
  * FD and KID of the reconstructions against a fixed reference set of real training clips, with the real test
    clips themselves as the floor;
  * probe accuracy: a ridge probe fitted on embeddings of real training clips (ridge chosen on valid, as in
    `soundctm-rt eval`) predicts each reconstruction's class label;
  * 95 % intervals of KID (half-sampling standard error) and probe accuracy (bootstrap) over the test clips
    (`ci_kid_x1e3`, `ci_probe_accuracy`),
    and each method's wall time per clip (`ms_per_clip`), so a decoder can be chosen from a quality-versus-time
    curve and adopted "at least as good within the interval";
  * the signal distances of report.py to each real clip (`mr_stft`: spectral convergence + log-magnitude L1 at
    5 resolutions; `mel_l1`), which see what the embedding does not: a phase that is less consistent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .birdnet import Embedding
from .data import ClipDataset
from .eval import EvalConfig, RidgeProbe, clip_labels, frechet_distance, kid, spread
from .report import clip_metrics

logger = logging.getLogger(__name__)


def embedding_report(
    methods: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    ds: ClipDataset,
    embed: Embedding,
    max_train_clips: int = 800,
    batch: int = 16,
    seed: int = 0,
    bootstrap: int = 200,
) -> dict[str, Any]:
    """{"real_test": floor figures, <method>: figures, "config": ...} on the test split (module docstring)."""
    sr = ds.sample_rate
    labels = clip_labels(ds)
    test_idx, valid_idx = ds.indices("test"), ds.indices("valid")
    ref_idx = spread(ds.indices("train"), max_train_clips)

    def emb(waves: np.ndarray) -> np.ndarray:
        return np.concatenate([embed(waves[i : i + 64], sr) for i in range(0, len(waves), 64)])

    e_ref = emb(ds.wave(ref_idx))
    e_valid = emb(ds.wave(valid_idx)) if len(valid_idx) else np.zeros((0, e_ref.shape[1]))  # first ridge then
    probe, ridge, valid_acc = RidgeProbe.select(
        e_ref,
        [labels[int(i)] for i in ref_idx],
        e_valid,
        [labels[int(i)] for i in valid_idx],
        EvalConfig.probe_ridges,
    )
    test_labels = [labels[int(i)] for i in test_idx]
    cfg = EvalConfig()
    rng = np.random.default_rng(seed)

    n_test = len(test_idx)
    pick = np.random.default_rng(seed + 1)
    boot = pick.integers(0, n_test, (bootstrap, n_test))
    halves = [pick.permutation(n_test)[: n_test // 2] for _ in range(bootstrap // 2)]

    def figures(e: np.ndarray) -> dict[str, Any]:
        predicted = probe.predict(e)
        correct = np.array([p == t for p, t in zip(predicted, test_labels, strict=True)], dtype=np.float64)
        per_class = {
            c: float(np.mean([ok for ok, t in zip(correct, test_labels, strict=True) if t == c]))
            for c in sorted(set(test_labels))
        }
        k = 1e3 * kid(e, e_ref, cfg.kid_subsets, cfg.kid_subset_size, rng)
        # KID is an unbiased U-statistic, and a bootstrap resample's duplicates would bias it upwards: its
        # interval comes from half-samples without replacement instead (the variance of a half-sample
        # estimate is about twice the full one's)
        half_kids = [1e3 * kid(e[h], e_ref, 1, 0, rng) for h in halves]
        se = float(np.std(half_kids, ddof=1)) / np.sqrt(2.0)
        return {
            "fd": frechet_distance(e, e_ref),
            "kid_x1e3": k,
            "probe_accuracy": float(correct.mean()),
            "ci_kid_x1e3": [float(k - 1.96 * se), float(k + 1.96 * se)],
            "ci_probe_accuracy": [float(v) for v in np.percentile(correct[boot].mean(1), [2.5, 97.5])],
            # per class label: a decoder that loses one class (a bark, a crow) shows here, not in the average
            "per_class_probe_accuracy": per_class,
        }

    real = ds.wave(test_idx)
    out: dict[str, Any] = {"real_test": figures(emb(real))}
    for name, fn in methods.items():
        with torch.no_grad():
            fn(torch.from_numpy(real[:1]))  # warm-up (JIT compiles, caches), so ms_per_clip is the steady cost
        t0 = time.perf_counter()
        with torch.no_grad():
            rec = np.concatenate(
                [fn(torch.from_numpy(real[i : i + batch])).numpy() for i in range(0, len(real), batch)]
            )
        ms = 1e3 * (time.perf_counter() - t0) / len(real)
        signal = clip_metrics(torch.from_numpy(rec), torch.from_numpy(real), sr)
        out[name] = {
            **figures(emb(rec)),
            "ms_per_clip": ms,
            "mr_stft": float(signal["mr_stft"].mean()),
            "mel_l1": float(signal["mel_l1"].mean()),
        }
        logger.info("%s: %s", name, out[name])
    out["config"] = {
        "embedding": embed.name,
        "reference": f"{len(ref_idx)} real training clips",
        "test_clips": len(test_idx),
        "probe_ridge": ridge,
        "probe_accuracy_real_valid": valid_acc,
        "probe_classes": len(probe.classes),
    }
    return out


def adoption_verdict(
    report: dict[str, Any], learned: str, baselines: list[str], within_ci: bool = False
) -> dict[str, Any]:
    """Whether `learned` is better than every baseline on both KID (lower) and probe accuracy (higher); with
    `within_ci`, "at least as good within the interval": its KID no higher than the baseline's upper 95 % bound
    and its probe accuracy no lower than the baseline's lower bound."""
    r = report[learned]

    def ok(b: str) -> dict[str, bool]:
        base = report[b]
        if within_ci:
            return {
                "kid": r["kid_x1e3"] <= base["ci_kid_x1e3"][1],
                "probe_accuracy": r["probe_accuracy"] >= base["ci_probe_accuracy"][0],
            }
        return {
            "kid": r["kid_x1e3"] < base["kid_x1e3"],
            "probe_accuracy": r["probe_accuracy"] > base["probe_accuracy"],
        }

    beats = {b: {k: bool(v) for k, v in ok(b).items()} for b in baselines}
    return {"adopt": all(all(v.values()) for v in beats.values()), "beats": beats, "within_ci": within_ci}
