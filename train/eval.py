"""Quality evaluation of a distilled student against its teacher on held-out prompts (DESIGN "Benchmarks and
evaluation"). Everything runs in torch on the training-side weights.

Prompts: the captions of the test split's clips (up to K, evenly spread over the split); each prompt carries the
label of its clip. For every seed, one initial noise x_T per prompt (and one noise per γ step) is shared by all
rows, so rows are paired. Rows:
  * teacher: Heun with the CFG-guided denoiser (METHOD §3.5) on the `teacher_steps`-point Karras grid;
  * student: γ-sampling (METHOD §4, ν-guidance) for every (steps, γ);
  * student ODE: Heun with the student's own denoiser g(x, t, t; ω) (METHOD §4, "unifying");
  * optionally an ablation student (e.g. trained with the plain L2 distance) at every step count, γ = 0.
Per row and seed, in an audio embedding (BirdNET by default, train.birdnet):
  * fd, kid: Fréchet distance and KID (polynomial kernel) between generated clips and all real test clips;
  * adherence: accuracy of a linear (ridge) probe, fitted on embeddings of real training clips and their labels,
    on the generated clips w.r.t. the prompt's label;
  * paired_teacher_distance: log-mel L1 (train.losses.mel_l1) between the row's clip and the teacher's clip of
    the same noise, prompt and ω;
  * nn_similarity: cosine similarity of each clip to its nearest training clip (memorisation check);
  * seconds_per_clip: wall time of sampling + decode per clip, batched, at this process's thread count;
  * level: the fraction of takes whose peak is below −40 dBFS, and of takes with a sample beyond ±1.0 (before
    the runtime's limiter).
Per class (the label of the prompt's clip), for the teacher and the γ = 0 student rows, pooled over seeds
("per_class"): the probe's accuracy on the real test clips of the class and on the generated takes, the most
frequent wrong label, and the median peak and RMS (dBFS) of real and generated clips — a collapse onto a few
classes, or a class that comes out 40 dB too quiet, shows here even when the averages look fine.
Values are means over seeds with 95 % t-intervals. The floor: real clips (valid split, and training clips) vs the
same real test clips, subsampled to the same size as a generated set, over the same seeds; the probe's accuracy and
the nearest-neighbour similarity of the real test clips are the references for adherence and memorisation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..level import normalise_level
from ..logs import task_bar
from .birdnet import Embedding
from .checkpoint import ModelSource, load_model_checkpoint
from .conditioning import encode_prompts
from .ctm import cfg_teacher_denoiser, student_denoiser
from .data import ClipDataset, clip_labels
from .edm import karras_sigmas, sampling_sigmas
from .latent import MelCodec
from .losses import mel_l1
from .models.denoiser import Conditioning
from .sampling import guided_jump, sample_gamma, sample_heun

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    """What `soundctm-rt eval` measures and how (saved in the JSON's "config")."""

    steps: tuple[int, ...] = (1, 2, 4, 8)  # student step counts
    gammas: tuple[float, ...] = (0.0, 1.0)  # METHOD §4
    teacher_steps: int = 40  # Karras grid points of the teacher's Heun sampler (METHOD §1: N = 40)
    ode_steps: int = 40  # grid points of the student's own Heun ODE sampling (0: no such row)
    omega: float = 0.0  # CFG ω of teacher and student; 0 = the student's edm.default_omega
    nu: float = 1.0  # METHOD §4 ν-guidance of the student
    seeds: tuple[int, ...] = (0, 1, 2)
    max_prompts: int = 96  # test captions used (evenly spread); 0 = all test clips
    max_train_clips: int = 800  # training clips embedded for the probe and the memorisation check; 0 = all
    batch: int = 16  # clips per generation batch
    kid_subsets: int = 50
    kid_subset_size: int = 0  # 0 = the smaller of the two sets
    # ridge α per training example (α = r · n, standardised features), the one with the best accuracy on the
    # real valid clips is used (measured on the cpu dataset with BirdNET: 0.01 -> 0.44, 0.3 -> 0.69, 10 -> 0.56)
    probe_ridges: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
    embedding: str = "birdnet"  # "birdnet" | "logmel" | "auto"
    # "runtime": a mel model's takes are decoded at the level the runtime writes (soundctm_rt/level.py: each code
    # set to a predicted -1 dBFS peak), so the level figures are what a user gets; "raw": the level the model made
    level: str = "runtime"

    def __post_init__(self) -> None:
        if self.level not in ("runtime", "raw"):
            raise ValueError(f"eval: level must be 'runtime' or 'raw', not {self.level!r}")
        if not self.steps or min(self.steps) < 1 or not self.seeds:
            raise ValueError("eval: steps must be >= 1 and at least one seed is needed")
        if any(not 0.0 <= g <= 1.0 for g in self.gammas):
            raise ValueError("eval: gammas must be in [0, 1]")
        if self.teacher_steps < 2 or self.ode_steps == 1 or self.ode_steps < 0:
            raise ValueError("eval: teacher_steps >= 2 and ode_steps 0 or >= 2")


# ------------------------------------------------------------------------------------------------ metrics


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2(Σ_a Σ_b)^½) of two embedding sets [N, D] (Heusel et al. 2017).

    tr((Σ_a Σ_b)^½) is the sum of the square roots of the eigenvalues of Σ_a Σ_b, which are those of the
    symmetric PSD matrix X_a Σ_b X_aᵀ/(N_a − 1) (X_a centred; N_a × N_a, small when N_a < D) or else of
    Σ_a^½ Σ_b Σ_a^½ (D × D): exact, and no general matrix square root.
    """
    for name, x in (("first", a), ("second", b)):
        if not np.isfinite(x).all():
            bad = int((~np.isfinite(x).all(1)).sum())
            raise ValueError(f"Fréchet distance: {bad} of {len(x)} embeddings of the {name} set are not finite")
    mu_a, mu_b = a.mean(0), b.mean(0)
    xa = a - mu_a
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    if len(a) < a.shape[1]:
        m = xa @ cov_b @ xa.T / (len(a) - 1)
    else:
        w, v = np.linalg.eigh(cov_a)
        root_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
        m = root_a @ cov_b @ root_a
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum())
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_covmean)


def kid(a: np.ndarray, b: np.ndarray, subsets: int, subset_size: int, rng: np.random.Generator) -> float:
    """Kernel inception distance: unbiased MMD² with k(x, y) = (x·y/D + 1)³, averaged over random subsets of
    `subset_size` (0 = the smaller set's size) of each set (Bińkowski et al. 2018)."""
    m = min(len(a), len(b)) if subset_size <= 0 else min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError("KID needs at least 2 examples per set")
    d = a.shape[1]
    vals = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        off = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        vals.append(off - 2.0 * kxy.mean())
    return float(np.mean(vals))


@dataclass
class RidgeProbe:
    """Linear probe: standardised features, one-vs-rest ridge regression on one-hot labels, argmax."""

    mean: np.ndarray
    scale: np.ndarray
    W: np.ndarray  # [D + 1, K]
    classes: list[str]

    @classmethod
    def fit(cls, x: np.ndarray, labels: list[str], ridge: float) -> RidgeProbe:
        classes = sorted(set(labels))
        mean, scale = x.mean(0), x.std(0) + 1e-8
        z = np.hstack([(x - mean) / scale, np.ones((len(x), 1))])
        y = np.zeros((len(x), len(classes)))
        y[np.arange(len(x)), [classes.index(c) for c in labels]] = 1.0
        reg = ridge * len(x) * np.eye(z.shape[1])
        reg[-1, -1] = 0.0  # no penalty on the bias
        return cls(mean, scale, np.linalg.solve(z.T @ z + reg, z.T @ y), classes)

    @classmethod
    def select(
        cls,
        x: np.ndarray,
        labels: list[str],
        x_valid: np.ndarray,
        labels_valid: list[str],
        ridges: tuple[float, ...],
    ) -> tuple[RidgeProbe, float, float | None]:
        """The probe whose ridge gives the best accuracy on (x_valid, labels_valid) (the first ridge when there
        is no validation set). Returns (probe, ridge, its validation accuracy or None)."""
        if len(x_valid) == 0:
            return cls.fit(x, labels, ridges[0]), ridges[0], None
        best: tuple[float, float, RidgeProbe] | None = None
        for r in ridges:
            p = cls.fit(x, labels, r)
            acc = p.accuracy(x_valid, labels_valid)
            if best is None or acc > best[0]:
                best = (acc, r, p)
        assert best is not None
        return best[2], best[1], best[0]

    def predict(self, x: np.ndarray) -> list[str]:
        z = np.hstack([(x - self.mean) / self.scale, np.ones((len(x), 1))])
        return [self.classes[i] for i in (z @ self.W).argmax(1)]

    def accuracy(self, x: np.ndarray, labels: list[str]) -> float:
        return float(np.mean([p == t for p, t in zip(self.predict(x), labels, strict=True)]))


def nn_similarity(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of x [N, D] to its nearest row of ref [M, D] -> [N]."""
    xn = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)
    rn = ref / (np.linalg.norm(ref, axis=1, keepdims=True) + 1e-12)
    return (xn @ rn.T).max(1)


def mean_ci(values: list[float]) -> dict[str, Any]:
    """Mean over seeds and a 95 % t-interval (None with one seed)."""
    from scipy.stats import t as student_t

    v = np.asarray(values, dtype=np.float64)
    out: dict[str, Any] = {"mean": float(v.mean()), "per_seed": [float(x) for x in v]}
    if len(v) > 1:
        half = float(student_t.ppf(0.975, df=len(v) - 1)) * v.std(ddof=1) / np.sqrt(len(v))
        out["ci95"] = [float(v.mean() - half), float(v.mean() + half)]
    else:
        out["ci95"] = None
    return out


# ---------------------------------------------------------------------------------------------- data side


def spread(idx: np.ndarray, k: int) -> np.ndarray:
    """k indices evenly spread over idx (all of them when k is 0 or >= len)."""
    if k <= 0 or k >= len(idx):
        return idx
    return idx[np.round(np.linspace(0, len(idx) - 1, k)).astype(np.int64)]


def load_checkpoint_of(run: str | Path, name: str) -> ModelSource:
    """A run directory's final/<name> (or the file itself)."""
    p = Path(run)
    path = p if p.is_file() else p / "final" / name
    return load_model_checkpoint(path)


# ------------------------------------------------------------------------------------------ generation


Sampler = Callable[[torch.Tensor, Conditioning, Conditioning, torch.Tensor, list[torch.Tensor]], torch.Tensor]


@torch.no_grad()
def generate(
    src: ModelSource,
    sampler: Sampler,
    prompts: list[str],
    eps_T: torch.Tensor,
    noises: list[torch.Tensor],
    batch: int,
    level: str = "runtime",
) -> tuple[np.ndarray, float]:
    """Audio [P, samples] of a sampler for the prompts and the given noise, and the wall seconds it took
    (sampling + decode). eps_T [P, C, T] unit noise; noises: per-step unit noise [P, C, T] each. `level`: as
    EvalConfig.level (the soft limiter is not applied: "beyond ±1.0" counts what it would have to catch)."""
    cfg = src.config
    uncond1 = encode_prompts(src.text, [""], cfg.text.max_length)
    out = []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        j = slice(i, i + batch)
        cond = encode_prompts(src.text, prompts[j], cfg.text.max_length)
        b = cond.tokens.shape[0]
        x0 = sampler(eps_T[j], cond, uncond1.expand(b), torch.empty(0), [n[j] for n in noises])
        out.append(_decode(src, x0, level))
    return np.concatenate(out), time.perf_counter() - t0


def _decode(src: ModelSource, x0: torch.Tensor, level: str) -> np.ndarray:
    if level == "raw" or not isinstance(src.codec, MelCodec):
        return src.decode(x0).numpy()
    code = src.denormalise(x0).detach().float().cpu().numpy()
    dec = src.codec.decoder
    return dec.decode(normalise_level(dec, code))


def teacher_sampler(src: ModelSource, steps: int, omega: float) -> Sampler:
    """Heun with the CFG teacher on the `steps`-point Karras grid from x_T = σ_max·ε (METHOD §1, §3.5)."""
    e = src.config.edm
    sig = karras_sigmas(steps, e.sigma_min, e.sigma_max, e.rho)

    def run(eps_T, cond, uncond, _, __):
        w = torch.full((eps_T.shape[0],), omega)
        return sample_heun(cfg_teacher_denoiser(src.student, cond, uncond, w), sig[0] * eps_T, sig)

    return run


def student_gamma_sampler(src: ModelSource, steps: int, gamma: float, omega: float, nu: float) -> Sampler:
    """METHOD §4 γ-sampling with ν-guidance (train.sampling)."""
    e = src.config.edm
    sig = sampling_sigmas(steps, e)

    def run(eps_T, cond, uncond, _, noises):
        jump = guided_jump(src.student, cond, uncond, omega, nu)
        return sample_gamma(jump, sig[0] * eps_T, sig, gamma, noises, e.sigma_min)

    return run


def student_ode_sampler(src: ModelSource, steps: int, omega: float, nu: float) -> Sampler:
    """Heun ODE sampling with the student's own denoiser g(x, t, t; ω) (METHOD §4)."""
    e = src.config.edm
    sig = karras_sigmas(steps, e.sigma_min, e.sigma_max, e.rho)

    def run(eps_T, cond, uncond, _, __):
        return sample_heun(student_denoiser(src.student, cond, uncond, omega, nu), sig[0] * eps_T, sig)

    return run


# -------------------------------------------------------------------------------------------- evaluation


def _run_name(src: ModelSource) -> str:
    return str(src.provenance.get("distill", {}).get("distance", "teacher_features"))


def evaluate(
    student: ModelSource | None,
    teacher: ModelSource,
    ds: ClipDataset,
    embed: Embedding,
    cfg: EvalConfig,
    ablation: ModelSource | None = None,
    paths: dict[str, str | None] | None = None,
) -> dict[str, Any]:
    """The evaluation table as a JSON-able dict {"rows", "floor", "config"} (module docstring). Without a
    student only the teacher row is measured."""
    mc = (student or teacher).config
    omega = cfg.omega or mc.edm.default_omega
    sr = ds.sample_rate
    labels = clip_labels(ds)
    test_idx = ds.indices("test")
    prompt_idx = spread(test_idx, cfg.max_prompts)
    prompts = [ds.captions[int(i)] for i in prompt_idx]
    prompt_labels = [labels[int(i)] for i in prompt_idx]
    train_idx = spread(ds.indices("train"), cfg.max_train_clips)
    valid_idx = ds.indices("valid")
    logger.info(
        "eval: %d prompts, %d real test clips, %d training clips (probe, memorisation), %d seeds, embedding %s",
        len(prompts),
        len(test_idx),
        len(train_idx),
        len(cfg.seeds),
        embed.name,
    )

    def emb_of(idx: np.ndarray) -> np.ndarray:
        return np.concatenate([embed(ds.wave(idx[i : i + 64]), sr) for i in range(0, len(idx), 64)])

    e_test, e_train = emb_of(test_idx), emb_of(train_idx)
    e_valid = emb_of(valid_idx) if len(valid_idx) else np.zeros((0, e_test.shape[1]))
    train_labels = [labels[int(i)] for i in train_idx]
    probe, ridge, valid_acc = RidgeProbe.select(
        e_train, train_labels, e_valid, [labels[int(i)] for i in valid_idx], cfg.probe_ridges
    )
    test_labels = [labels[int(i)] for i in test_idx]
    ref_nn = nn_similarity(e_test, e_train)
    P = len(prompts)

    # rows: (model, sampler, steps, gamma, source, sampler fn)
    plans: list[tuple[str, str, int, float, ModelSource, Sampler]] = [
        ("teacher", "heun", cfg.teacher_steps, 0.0, teacher, teacher_sampler(teacher, cfg.teacher_steps, omega))
    ]
    if student is not None:
        for steps in cfg.steps:
            for gamma in cfg.gammas:
                sampler = student_gamma_sampler(student, steps, gamma, omega, cfg.nu)
                plans.append(("student", "gamma", steps, gamma, student, sampler))
        if cfg.ode_steps:
            sampler = student_ode_sampler(student, cfg.ode_steps, omega, cfg.nu)
            plans.append(("student", "ode", cfg.ode_steps, 0.0, student, sampler))
    if ablation is not None:
        for steps in cfg.steps:
            plans.append(
                ("student", "gamma", steps, 0.0, ablation, student_gamma_sampler(ablation, steps, 0.0, omega, cfg.nu))
            )

    C, T = mc.latent_channels, mc.dit.latent_frames
    warm = torch.randn(1, C, T, generator=torch.Generator().manual_seed(0))
    for *_, src, fn in plans:  # warm-up, so that seconds_per_clip of the first seed is not a cold start
        generate(src, fn, prompts[:1], warm, [warm] * (max([*cfg.steps, 1]) - 1), 1)
    per_row: list[dict[str, list[float]]] = [{} for _ in plans]
    per_row_clips: list[dict[str, list[Any]]] = [{"pred": [], "peak_db": [], "rms_db": []} for _ in plans]
    floor_acc: dict[str, list[float]] = {}
    max_steps = max([*cfg.steps, 1])
    bar = task_bar(len(cfg.seeds) * len(plans), "eval", logger)
    for seed in cfg.seeds:
        g = torch.Generator().manual_seed(seed)
        eps_T = torch.randn(P, C, T, generator=g)
        noises = [torch.randn(P, C, T, generator=g) for _ in range(max_steps - 1)]
        rng = np.random.default_rng(seed)
        teacher_wave = None
        for r, (model, sampler_name, steps, gamma, src, fn) in enumerate(plans):
            wave, secs = generate(src, fn, prompts, eps_T, noises[: max(steps - 1, 0)], cfg.batch, cfg.level)
            if r == 0:
                teacher_wave = wave
            emb = embed(wave, sr)
            peak_db, rms_db = level_db(wave)
            clips = per_row_clips[r]
            clips["pred"] += probe.predict(emb)
            clips["peak_db"] += peak_db.tolist()
            clips["rms_db"] += rms_db.tolist()
            m = per_row[r]
            vals = {
                "fd": frechet_distance(emb, e_test),
                "kid": kid(emb, e_test, cfg.kid_subsets, cfg.kid_subset_size, rng),
                "adherence": probe.accuracy(emb, prompt_labels),
                "paired_teacher_distance": float(mel_l1(torch.from_numpy(wave), torch.from_numpy(teacher_wave), sr)),
                "nn_similarity": float(nn_similarity(emb, e_train).mean()),
                "seconds_per_clip": secs / P,
                "frac_peak_below_-40dB": float((peak_db < -40.0).mean()),
                "frac_over_full_scale": float((peak_db > 0.0).mean()),
            }
            for k, x in vals.items():
                m.setdefault(k, []).append(x)
            logger.info("seed %d %s %s steps=%d gamma=%g: %s", seed, model, sampler_name, steps, gamma, vals)
            bar.update()
        for name, ref in (("valid_vs_test", e_valid), ("train_vs_test", e_train)):
            if len(ref) < 2:
                continue
            sub = ref[rng.choice(len(ref), min(P, len(ref)), replace=False)]
            floor_acc.setdefault(f"{name}_fd", []).append(frechet_distance(sub, e_test))
            floor_acc.setdefault(f"{name}_kid", []).append(kid(sub, e_test, cfg.kid_subsets, cfg.kid_subset_size, rng))
    bar.close()

    real_peak, real_rms = level_db(ds.wave(test_idx))
    real_pred = probe.predict(e_test)
    rows = []
    for (model, sampler_name, steps, gamma, src, _), m, clips in zip(plans, per_row, per_row_clips, strict=True):
        row: dict[str, Any] = {
            "model": model,
            "sampler": sampler_name,
            "steps": steps,
            "gamma": gamma if sampler_name == "gamma" else None,
            "distance": None if model == "teacher" else _run_name(src),
            "ablation": src is ablation,
            "omega": omega,
            "nu": None if model == "teacher" else cfg.nu,
        }
        for k, v in m.items():
            s = mean_ci(v)
            row[k] = s["mean"]
            row[f"{k}_ci95"] = s["ci95"]
            row[f"{k}_per_seed"] = s["per_seed"]
        if model == "teacher" or (sampler_name == "gamma" and gamma == 0.0 and src is not ablation):
            row["per_class"] = per_class_table(
                test_labels,
                real_pred,
                real_peak,
                real_rms,
                prompt_labels * len(cfg.seeds),
                clips["pred"],
                np.asarray(clips["peak_db"]),
                np.asarray(clips["rms_db"]),
            )
        rows.append(row)
    floor: dict[str, Any] = {
        "set_size": P,
        "probe_accuracy_real_test": probe.accuracy(e_test, test_labels),
        "nn_similarity_real_test": float(ref_nn.mean()),
        "nn_similarity_real_test_p95": float(np.quantile(ref_nn, 0.95)),
        "probe_classes": len(probe.classes),
        "probe_ridge": ridge,
        "probe_accuracy_real_valid": valid_acc,
    }
    for k, v in floor_acc.items():
        s = mean_ci(v)
        floor[k], floor[f"{k}_ci95"] = s["mean"], s["ci95"]
    config = {
        **dataclasses.asdict(cfg),
        "omega_used": omega,
        "embedding_used": embed.name,
        "embedding_source": getattr(embed, "source", None),
        "prompts": len(prompts),
        "real_test_clips": len(test_idx),
        "train_clips_embedded": len(train_idx),
        "valid_clips": len(valid_idx),
        "torch_threads": torch.get_num_threads(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "student_provenance": student.provenance if student is not None else None,
        "teacher_provenance": teacher.provenance,
        **(paths or {}),
    }
    return {"rows": rows, "floor": floor, "config": config}


def level_db(wave: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Peak and RMS in dBFS of each clip [N, samples] -> ([N], [N]) (−120 for digital silence)."""
    w = np.asarray(wave, dtype=np.float64)
    peak = np.abs(w).max(axis=1)
    rms = np.sqrt((w**2).mean(axis=1))
    return 20 * np.log10(np.maximum(peak, 1e-6)), 20 * np.log10(np.maximum(rms, 1e-6))


def per_class_table(
    real_labels: list[str],
    real_pred: list[str],
    real_peak: np.ndarray,
    real_rms: np.ndarray,
    gen_labels: list[str],
    gen_pred: list[str],
    gen_peak: np.ndarray,
    gen_rms: np.ndarray,
) -> dict[str, dict[str, Any]]:
    """{class: probe accuracy on real / generated clips of the class, the most frequent wrong label of the
    generated ones, median peak and RMS dBFS of both, and the counts}."""
    out: dict[str, dict[str, Any]] = {}
    for c in sorted(set(real_labels) | set(gen_labels)):
        ri = [i for i, lab in enumerate(real_labels) if lab == c]
        gi = [i for i, lab in enumerate(gen_labels) if lab == c]
        wrong = [gen_pred[i] for i in gi if gen_pred[i] != c]
        top = max(set(wrong), key=wrong.count) if wrong else None
        out[c] = {
            "real_clips": len(ri),
            "generated_clips": len(gi),
            "probe_real": float(np.mean([real_pred[i] == c for i in ri])) if ri else None,
            "probe_generated": float(np.mean([gen_pred[i] == c for i in gi])) if gi else None,
            "top_wrong_label": top,
            "top_wrong_share": wrong.count(top) / len(gi) if top is not None else 0.0,
            "real_peak_db_median": float(np.median(real_peak[ri])) if ri else None,
            "generated_peak_db_median": float(np.median(gen_peak[gi])) if gi else None,
            "real_rms_db_median": float(np.median(real_rms[ri])) if ri else None,
            "generated_rms_db_median": float(np.median(gen_rms[gi])) if gi else None,
        }
    return out


def per_class_markdown(row: dict[str, Any]) -> list[str]:
    """A per-class table of one row (probe accuracy and level, real vs generated)."""
    title = f"{row['model']} {row['sampler']} {row['steps']} step(s)" + (
        f", γ = {row['gamma']}" if row["gamma"] is not None else ""
    )
    lines = [
        "",
        f"Per class — {title}:",
        "",
        "| class | probe real | probe generated | most frequent wrong label | peak dB real / gen | RMS dB real / gen |",
        "|---|---|---|---|---|---|",
    ]

    def f(v: Any, d: int = 2) -> str:
        return "–" if v is None else f"{v:.{d}f}"

    for c, r in row["per_class"].items():
        wrong = f"{r['top_wrong_label']} ({r['top_wrong_share']:.2f})" if r["top_wrong_label"] else "–"
        lines.append(
            f"| {c} | {f(r['probe_real'])} | {f(r['probe_generated'])} | {wrong} | "
            f"{f(r['real_peak_db_median'], 1)} / {f(r['generated_peak_db_median'], 1)} | "
            f"{f(r['real_rms_db_median'], 1)} / {f(r['generated_rms_db_median'], 1)} |"
        )
    return lines


def class_target_summary(row: dict[str, Any], min_real: float = 0.5) -> dict[str, Any]:
    """How many classes with real probe accuracy >= min_real reach half of it in generated takes, and how many
    are within 6 dB of the real median peak."""
    eligible = {
        c: r for c, r in row["per_class"].items() if r["probe_real"] is not None and r["probe_real"] >= min_real
    }
    reach = [c for c, r in eligible.items() if (r["probe_generated"] or 0.0) >= 0.5 * r["probe_real"]]
    level_ok = [
        c
        for c, r in row["per_class"].items()
        if r["real_peak_db_median"] is not None
        and r["generated_peak_db_median"] is not None
        and abs(r["generated_peak_db_median"] - r["real_peak_db_median"]) <= 6.0
    ]
    return {
        "eligible_classes": len(eligible),
        "classes_reaching_half_of_real": len(reach),
        "classes_within_6db_peak": len(level_ok),
        "classes": len(row["per_class"]),
    }


def _fmt(v: Any, ci: Any, scale: float = 1.0, digits: int = 2) -> str:
    if v is None:
        return "–"
    s = f"{v * scale:.{digits}f}"
    if ci:
        s += f" [{ci[0] * scale:.{digits}f}, {ci[1] * scale:.{digits}f}]"
    return s


def markdown(result: dict[str, Any]) -> str:
    """The table of an evaluation result, like the paper's (KID ×1e3), with the floor beneath."""
    lines = [
        f"Embedding: {result['config']['embedding_used']}; {result['config']['prompts']} prompts × "
        f"{len(result['config']['seeds'])} seeds; ω = {result['config']['omega_used']}; 95 % CIs over seeds.",
        "",
        "| model | distance | sampler | steps | γ | FD | KID×1e3 | adherence | paired dist. | NN sim. | s/clip |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']}{' (ablation)' if r['ablation'] else ''} | {r['distance'] or '–'} | {r['sampler']} | "
            f"{r['steps']} | {'–' if r['gamma'] is None else r['gamma']} | {_fmt(r['fd'], r['fd_ci95'])} | "
            f"{_fmt(r['kid'], r['kid_ci95'], 1e3)} | {_fmt(r['adherence'], r['adherence_ci95'], 1, 3)} | "
            f"{_fmt(r['paired_teacher_distance'], None, 1, 3)} | {_fmt(r['nn_similarity'], None, 1, 3)} | "
            f"{r['seconds_per_clip']:.3f} |"
        )
    f = result["floor"]
    lines += ["", "Floor (real clips vs the real test clips, same set size):", ""]
    for name in ("valid_vs_test", "train_vs_test"):
        if f"{name}_fd" in f:
            lines.append(
                f"- {name}: FD {_fmt(f[f'{name}_fd'], f.get(f'{name}_fd_ci95'))}, "
                f"KID×1e3 {_fmt(f[f'{name}_kid'], f.get(f'{name}_kid_ci95'), 1e3)}"
            )
    lines.append(
        f"- probe accuracy on real test clips: {f['probe_accuracy_real_test']:.3f} ({f['probe_classes']} classes)"
    )
    lines.append(
        f"- NN similarity of real test clips to training clips: mean {f['nn_similarity_real_test']:.3f}, "
        f"p95 {f['nn_similarity_real_test_p95']:.3f}"
    )
    lines += ["", "| model | steps | takes peak < −40 dBFS | takes beyond ±1.0 |", "|---|---|---|---|"]
    for r in result["rows"]:
        if "frac_peak_below_-40dB" in r:
            lines.append(
                f"| {r['model']} {r['sampler']} | {r['steps']} | {r['frac_peak_below_-40dB']:.3f} | "
                f"{r['frac_over_full_scale']:.3f} |"
            )
    for r in result["rows"]:
        if r.get("per_class"):  # the teacher and every γ = 0 student row
            lines += per_class_markdown(r)
            t = class_target_summary(r)
            lines.append(
                f"\n{t['classes_reaching_half_of_real']} of {t['eligible_classes']} classes with real probe "
                f"accuracy ≥ 0.5 reach half of it; {t['classes_within_6db_peak']} of {t['classes']} classes have a "
                "median peak within 6 dB of the real one."
            )
    return "\n".join(lines) + "\n"


def write_result(result: dict[str, Any], json_path: Path, md_path: Path | None) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1))
    if md_path is not None:
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(markdown(result))
