"""The intensity-control report (METHOD §6): how close each method brings a clip's intensity to a target
curve, what it costs, and whether the sound is still what was asked for.

Cases: test prompts (one test clip per class label, corpora interleaved: train.figures.class_examples) × the
presets of train.control_curves. Every preset of a prompt starts from the same noise, drawn as the runtime draws
it (soundctm_rt.sampling.draw_noise with seed + prompt index), so the uncontrolled rows are the takes that
`soundctm-rt generate PROMPT --seed S --steps N --gamma 0` gives. Rows, all with ω, ν the same:
  * uncontrolled: γ = 0 sampling at `fast_steps` (the real-time default) and at `steps`;
  * level_only (reference): the uncontrolled take at `steps` scaled by the gain that meets the target's mean
    level (train.control.with_level): what a gain alone does, without generative control;
  * noise_optimisation (a): ε_T optimised per step count through that γ = 0 sampler (or, with
    noise_through_sampler off, through the one-step map), then γ = 0 sampling;
  * loss_guidance (b): γ = 0 sampling at `steps` with the loss-guidance nudges.
With match_level, (a) and (b) control the curve's shape and then take the same kind of gain as level_only.
Per row: dB RMSE of the result's intensity (train.control.intensity_db) to the target (mean with a normal 95 %
interval over cases, median, per preset, and the share of cases better than the uncontrolled take at the same
step count); adherence: a ridge probe on BirdNET embeddings of real training clips (train.eval.RidgeProbe, ridge
chosen on the valid split) predicts each clip's class, scored against the prompt's label and against the class
it predicted for the uncontrolled take; seconds per clip (batched; decode included) and the latency of one clip
alone, at this process's thread count.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..logs import task_bar
from ..sampling import draw_noise
from .birdnet import Embedding
from .checkpoint import ModelSource
from .conditioning import encode_prompts
from .control import (
    INTENSITY_FLOOR_DB,
    ControlConfig,
    intensity_db,
    sample_loss_guided,
    sample_noise_optimised,
    sample_uncontrolled,
    student_jump,
    with_level,
)
from .control_curves import PRESET_HIGH_DB, PRESET_LOW_DB, PRESETS, preset_points, resample
from .data import ClipDataset
from .eval import RidgeProbe, clip_labels, spread
from .figures import class_examples

logger = logging.getLogger(__name__)

METHODS = ("uncontrolled", "level_only", "noise_optimisation", "loss_guidance")


@dataclass(frozen=True)
class ControlEvalConfig:
    """What `soundctm-rt eval-control` measures (saved in the JSON's "config")."""

    prompts: int = 24  # test prompts, one class label each (27 labels in the cpu test split)
    presets: tuple[str, ...] = PRESETS
    steps: int = 4  # the common step count of the three methods (loss guidance needs > 1)
    fast_steps: int = 1  # uncontrolled and (a) also at this count: the real-time default
    omega: float = 0.0  # 0: the student's default ω
    nu: float = 1.0
    seed: int = 0  # prompt k uses seed + k, as `generate --seed` does for take k
    batch: int = 16  # cases per batch
    max_train_clips: int = 800  # real training clips the probe is fitted on (evenly spread)
    embedding: str = "birdnet"  # "birdnet" | "logmel" | "auto"
    figure_cases: int = 4  # rows of the PNG (one preset each, in turn)
    control: ControlConfig = field(default_factory=ControlConfig)

    def __post_init__(self) -> None:
        if self.steps < 2 or self.fast_steps < 1:
            raise ValueError("eval-control: steps >= 2 (loss guidance) and fast_steps >= 1")
        if self.prompts < 1 or not self.presets or self.batch < 1:
            raise ValueError("eval-control: at least one prompt, one preset and batch >= 1")
        bad = [p for p in self.presets if p not in PRESETS]
        if bad:
            raise ValueError(f"eval-control: unknown presets {bad}; known: {list(PRESETS)}")


@dataclass
class Case:
    prompt: str
    label: str
    preset: str
    prompt_index: int
    corpus: str = ""


def _timed_decode(src: ModelSource, x0: torch.Tensor) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    with torch.no_grad():
        y = src.decode(x0)
    return y, time.perf_counter() - t0


def run_batch(
    src: ModelSource,
    cases: list[Case],
    target: torch.Tensor,
    eps_T: torch.Tensor,
    noises: list[torch.Tensor],
    cfg: ControlEvalConfig,
    omega: float,
) -> dict[tuple[str, int], tuple[torch.Tensor, float]]:
    """Every row for a batch of cases: {(method, steps): (audio [B, N], seconds for the batch)}."""
    mc = src.config
    b = len(cases)
    cond = encode_prompts(src.text, [c.prompt for c in cases], mc.text.max_length)
    uncond = encode_prompts(src.text, [""], mc.text.max_length).expand(b)
    jump = student_jump(src, cond, uncond, omega, cfg.nu)
    out: dict[tuple[str, int], tuple[torch.Tensor, float]] = {}
    step_counts = sorted({cfg.fast_steps, cfg.steps})
    hop = mc.latent_hop

    def leveled(y: torch.Tensor) -> torch.Tensor:  # the gain step of match_level (train.control.with_level)
        return with_level(y, target, hop)[0] if cfg.control.match_level else y

    for n in step_counts:
        r = sample_uncontrolled(src, jump, eps_T, noises, n, 0.0)
        y, dt = _timed_decode(src, r.x0)
        out[("uncontrolled", n)] = (y, r.seconds + dt)
        if n == cfg.steps:  # reference: the gain alone, no generative control
            out[("level_only", n)] = (with_level(y, target, hop)[0], r.seconds + dt)
    for n in step_counts:  # each step count gets its own optimisation (through its sampler) and pays for it
        r = sample_noise_optimised(src, jump, eps_T, target, n, cfg.control)
        y, dt = _timed_decode(src, r.x0)
        out[("noise_optimisation", n)] = (leveled(y), r.seconds + dt)
    r = sample_loss_guided(src, jump, eps_T, noises, target, cfg.steps, 0.0, cfg.control)
    y, dt = _timed_decode(src, r.x0)
    out[("loss_guidance", cfg.steps)] = (leveled(y), r.seconds + dt)
    return out


def make_cases(ds: ClipDataset, cfg: ControlEvalConfig) -> list[Case]:
    """Prompts (one test clip per class label, corpora interleaved) × presets."""
    examples = class_examples(ds, cfg.prompts)
    if len(examples) < cfg.prompts:  # fewer labels than prompts asked for: fill with more test clips
        labels = clip_labels(ds)
        used = {i for _, i in examples}
        rest = [int(i) for i in spread(ds.indices("test"), cfg.prompts) if int(i) not in used]
        examples += [(labels[i], i) for i in rest[: cfg.prompts - len(examples)]]
    return [
        Case(ds.captions[i], label, preset, k, ds.rows[i].get("corpus") or "-")
        for k, (label, i) in enumerate(examples)
        for preset in cfg.presets
    ]


def _noise(cases: list[Case], shape: tuple[int, int], seed: int, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The runtime's noise of take seed + prompt_index for every case: ε_T [B, C, T], step noises [B, C, T]."""
    eps, noises = [], []
    for c in cases:
        e, ns = draw_noise(seed + c.prompt_index, (1, *shape), steps)
        eps.append(torch.from_numpy(e))
        noises.append([torch.from_numpy(n) for n in ns])
    return torch.cat(eps), [torch.cat([n[i] for n in noises]) for i in range(steps - 1)]


def mcnemar_p(lost: int, gained: int) -> float:
    """Exact two-sided McNemar test: the probability, under "control does not change adherence", of a split of
    the lost + gained discordant cases at least this uneven."""
    n = lost + gained
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(lost, gained) + 1)) / 2**n
    return min(1.0, 2.0 * tail)


def _mean_by(v: np.ndarray, groups: list[str]) -> dict[str, float]:
    """Mean of v [N] per group name (insertion order)."""
    return {g: float(np.mean([x for x, h in zip(v, groups, strict=True) if h == g])) for g in dict.fromkeys(groups)}


def _summary(v: np.ndarray) -> dict[str, Any]:
    half = 1.96 * v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else None
    return {
        "mean": float(v.mean()),
        "ci95": None if half is None else [float(v.mean() - half), float(v.mean() + half)],
        "median": float(np.median(v)),
    }


def evaluate_control(
    src: ModelSource,
    ds: ClipDataset,
    embed: Embedding,
    cfg: ControlEvalConfig,
    png: Path | None = None,
    paths: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The report as a JSON-able dict (module docstring); writes the PNG of a few cases when `png` is given."""
    mc = src.config
    omega = cfg.omega or mc.edm.default_omega
    T, C, hop = mc.dit.latent_frames, mc.latent_channels, mc.latent_hop
    rate, sr = mc.latent_rate, mc.sample_rate
    duration = T / rate
    cases = make_cases(ds, cfg)
    targets = torch.from_numpy(np.stack([resample(preset_points(c.preset, duration), T, rate) for c in cases]))
    max_steps = max(cfg.steps, cfg.fast_steps)
    logger.info(
        "eval-control: %d prompts × %d presets = %d cases", len(cases) // len(cfg.presets), len(cfg.presets), len(cases)
    )

    # warm-up, then the latency of one clip alone per row (the first case)
    eps1, noises1 = _noise(cases[:1], (C, T), cfg.seed, max_steps)
    warm = dataclasses.replace(cfg, control=dataclasses.replace(cfg.control, noise_iterations=1, guidance_iterations=1))
    run_batch(src, cases[:1], targets[:1], eps1, noises1, warm, omega)
    latency = {
        f"{m}@{n}": s for (m, n), (_, s) in run_batch(src, cases[:1], targets[:1], eps1, noises1, cfg, omega).items()
    }

    rmse: dict[tuple[str, int], list[float]] = {}
    seconds: dict[tuple[str, int], float] = {}
    emb: dict[tuple[str, int], list[np.ndarray]] = {}
    kept: dict[int, dict[tuple[str, int], np.ndarray]] = {}
    figure_idx = _figure_cases(cases, cfg)
    t_all = time.perf_counter()
    bar = task_bar(len(cases), "eval-control", logger)
    for i in range(0, len(cases), cfg.batch):
        batch = cases[i : i + cfg.batch]
        eps, noises = _noise(batch, (C, T), cfg.seed, max_steps)
        rows = run_batch(src, batch, targets[i : i + len(batch)], eps, noises, cfg, omega)
        for key, (y, secs) in rows.items():
            level = intensity_db(y, hop)
            err = ((level - targets[i : i + len(batch)]) ** 2).mean(-1).sqrt()
            rmse.setdefault(key, []).extend(err.tolist())
            seconds[key] = seconds.get(key, 0.0) + secs
            wave = y.numpy()
            emb.setdefault(key, []).append(embed(wave, sr))
            for j in range(len(batch)):
                if i + j in figure_idx:
                    kept.setdefault(i + j, {})[key] = wave[j]
        logger.info("eval-control: %d/%d cases, %.0f s", i + len(batch), len(cases), time.perf_counter() - t_all)
        bar.update(len(batch))
    bar.close()

    probe, probe_info = _fit_probe(ds, embed, cfg)
    labels = [c.label for c in cases]
    keys = list(rmse)
    preds = {k: probe.predict(np.concatenate(emb[k])) for k in keys}
    hits = {k: np.array([p == t for p, t in zip(preds[k], labels, strict=True)]) for k in keys}
    out_rows = []
    for method, n in keys:
        v = np.asarray(rmse[(method, n)])
        base = np.asarray(rmse[("uncontrolled", n)])
        row: dict[str, Any] = {
            "method": method,
            "steps": n,
            "gamma": 0.0,
            "db_rmse": _summary(v),
            "db_rmse_per_preset": _mean_by(v, [c.preset for c in cases]),
            "better_than_uncontrolled": None if method == "uncontrolled" else float(np.mean(v < base)),
            "adherence": float(np.mean(hits[(method, n)])),
            "adherence_per_preset": _mean_by(hits[(method, n)], [c.preset for c in cases]),
            "adherence_per_corpus": _mean_by(hits[(method, n)], [c.corpus for c in cases]),
            "same_class_as_uncontrolled": float(
                np.mean([a == b for a, b in zip(preds[(method, n)], preds[("uncontrolled", n)], strict=True)])
            ),
            "seconds_per_clip": seconds[(method, n)] / len(cases),
            "seconds_one_clip": latency[f"{method}@{n}"],
        }
        if method != "uncontrolled":  # paired: the same prompt, preset and noise without control
            ref = hits[("uncontrolled", n)]
            lost, gained = int((ref & ~hits[(method, n)]).sum()), int((~ref & hits[(method, n)]).sum())
            row["adherence_paired"] = {"lost": lost, "gained": gained, "mcnemar_p": mcnemar_p(lost, gained)}
        row["time_vs_uncontrolled"] = row["seconds_per_clip"] / (seconds[("uncontrolled", n)] / len(cases))
        out_rows.append(row)

    def pick(method: str) -> dict[str, Any]:
        return next(r for r in out_rows if r["method"] == method and r["steps"] == cfg.steps)

    result: dict[str, Any] = {
        "steps": cfg.steps,
        "uncontrolled_db_rmse": pick("uncontrolled")["db_rmse"]["mean"],
        "level_only_db_rmse": pick("level_only")["db_rmse"]["mean"],
        "noise_optimisation_db_rmse": pick("noise_optimisation")["db_rmse"]["mean"],
        "loss_guidance_db_rmse": pick("loss_guidance")["db_rmse"]["mean"],
        "adherence": {m: pick(m)["adherence"] for m in METHODS},
        "rows": out_rows,
        "probe": probe_info,
        "cases": [
            {
                "prompt": c.prompt,
                "label": c.label,
                "preset": c.preset,
                "corpus": c.corpus,
                "db_rmse": {f"{m}@{n}": rmse[(m, n)][k] for m, n in keys},
                "probe_class": {f"{m}@{n}": preds[(m, n)][k] for m, n in keys},
            }
            for k, c in enumerate(cases)
        ],
        "config": {
            **dataclasses.asdict(cfg),
            "omega_used": omega,
            "embedding_used": embed.name,
            "prompts_used": len(cases) // len(cfg.presets),
            "cases": len(cases),
            "clip_seconds": duration,
            "frame_rate_hz": rate,
            "preset_levels_db": {"high": PRESET_HIGH_DB, "low": PRESET_LOW_DB},
            "intensity_floor_db": INTENSITY_FLOOR_DB,
            "latent": src.config.latent,
            "total_seconds": time.perf_counter() - t_all,
            "torch_threads": torch.get_num_threads(),
            "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
            "model_provenance": src.provenance,
            **(paths or {}),
        },
    }
    if png is not None:
        shown = sorted(kept)
        result["figure"] = plot_cases(
            [cases[k] for k in shown], [kept[k] for k in shown], targets[shown].numpy(), cfg, mc, png
        )
    return result


def _figure_cases(cases: list[Case], cfg: ControlEvalConfig) -> set[int]:
    """figure_cases case indices: corpora in turn, prompts spread within each, preset k for row k."""
    n_presets = len(cfg.presets)
    by_corpus: dict[str, list[int]] = {}
    for c in cases[::n_presets]:
        by_corpus.setdefault(c.corpus, []).append(c.prompt_index)
    groups = list(by_corpus.values())
    per_group = -(-cfg.figure_cases // len(groups))
    out = set()
    for k in range(min(cfg.figure_cases, len(cases))):
        g = groups[k % len(groups)]
        p = g[min(len(g) - 1, (k // len(groups)) * max(1, len(g) // per_group))]
        out.add(p * n_presets + k % n_presets)
    return out


def _fit_probe(ds: ClipDataset, embed: Embedding, cfg: ControlEvalConfig) -> tuple[RidgeProbe, dict[str, Any]]:
    """The class probe on real training clips (ridge chosen on the valid split), and its accuracy on real test
    clips (the reference for adherence)."""
    from .eval import EvalConfig

    labels = clip_labels(ds)
    sr = ds.sample_rate

    def emb_of(idx: np.ndarray) -> np.ndarray:
        if len(idx) == 0:
            return np.zeros((0, 1))
        return np.concatenate([embed(ds.wave(idx[i : i + 64]), sr) for i in range(0, len(idx), 64)])

    train_idx, valid_idx, test_idx = (
        spread(ds.indices("train"), cfg.max_train_clips),
        ds.indices("valid"),
        ds.indices("test"),
    )
    e_train = emb_of(train_idx)
    e_valid = emb_of(valid_idx) if len(valid_idx) else np.zeros((0, e_train.shape[1]))
    probe, ridge, valid_acc = RidgeProbe.select(
        e_train,
        [labels[int(i)] for i in train_idx],
        e_valid,
        [labels[int(i)] for i in valid_idx],
        EvalConfig().probe_ridges,
    )
    return probe, {
        "classes": len(probe.classes),
        "ridge": ridge,
        "train_clips": len(train_idx),
        "accuracy_real_valid": valid_acc,
        "accuracy_real_test": probe.accuracy(emb_of(test_idx), [labels[int(i)] for i in test_idx]),
    }


# -------------------------------------------------------------------------------------------------- figure


def plot_cases(
    shown: list[Case],
    audio: list[dict[tuple[str, int], np.ndarray]],
    targets: np.ndarray,
    cfg: ControlEvalConfig,
    mc: Any,
    png: Path,
) -> dict[str, Any]:
    """Log-mel spectrograms (rows: cases; columns: the three methods at `steps`) with the target (dashed) and
    achieved (solid) intensity curves on a dB axis over them. targets [cases, T] dB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .losses import log_mel

    sr, hop, rate = mc.sample_rate, mc.latent_hop, mc.latent_rate
    cols = [(m, cfg.steps) for m in METHODS]
    fig, axes = plt.subplots(len(shown), len(cols), figsize=(4.4 * len(cols), 2.3 * len(shown)), squeeze=False)
    for r, (case, waves, target) in enumerate(zip(shown, audio, targets, strict=True)):
        dbs = {
            k: 20.0 / np.log(10.0) * log_mel(torch.from_numpy(w)[None], sr, 2048, 256, 96)[0].numpy()
            for k, w in waves.items()
        }
        vmax = max(-40.0, max(float(d.max()) for d in dbs.values()))
        for c, key in enumerate(cols):
            ax = axes[r][c]
            wave = waves[key]
            ax.imshow(
                dbs[key],
                origin="lower",
                aspect="auto",
                cmap="magma",
                vmin=vmax - 80,
                vmax=vmax,
                extent=(0.0, len(wave) / sr, 0, 96),
            )
            ax.set_yticks([])
            level = intensity_db(torch.from_numpy(wave)[None], hop)[0].numpy()
            t = (np.arange(len(level)) + 0.5) / rate
            tw = ax.twinx()
            tw.plot(t, target, "--", color="white", lw=1.4, label="target")
            tw.plot(t, level, "-", color="cyan", lw=1.2, label="achieved")
            tw.set_ylim(INTENSITY_FLOOR_DB, 0)
            tw.tick_params(labelsize=6)
            err = float(np.sqrt(np.mean((level - target) ** 2)))
            ax.set_title(
                f"{key[0]} ({key[1]} steps): {case.preset}, '{case.prompt}'"[:72] + f"\nRMSE {err:.1f} dB", fontsize=7
            )
            ax.tick_params(labelsize=6)
            if c == len(cols) - 1:
                tw.set_ylabel("dBFS", fontsize=6)
            if r == 0 and c == 0:
                tw.legend(fontsize=6, loc="upper right")
    for ax in axes[-1]:
        ax.set_xlabel("s", fontsize=6)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return {"png": str(png), "cases": [{"prompt": c.prompt, "label": c.label, "preset": c.preset} for c in shown]}


# ------------------------------------------------------------------------------------------------ markdown


def _ci(s: dict[str, Any]) -> str:
    return f"{s['mean']:.2f}" + (f" [{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}]" if s["ci95"] else "")


def markdown(result: dict[str, Any], png_name: str | None = None) -> str:
    """docs/control.md: the definitions, the settings and the measured table."""
    cfg = result["config"]
    cc = cfg["control"]
    presets = list(cfg["presets"])
    t_max = "" if cc["guidance_max_t"] is None else f" and t ≤ {cc['guidance_max_t']}"
    mel = cfg.get("latent") == "mel"  # reports before the mel code had a VAE latent
    reader = " and the intensity read from the mel code" if mel else " and the VAE decoder"
    decoder = "Griffin-Lim" if mel else "VAE"
    lines = [
        "# Intensity control (METHOD §6)",
        "",
        "Generated by `soundctm-rt eval-control`; every figure below is measured (see `control.json` for the raw",
        "numbers, per case).",
        "",
        "## Intensity",
        "",
        "Frame loudness of the decoded waveform in dBFS, one frame per latent frame "
        f"({cfg['frame_rate_hz']:.2f} Hz; the clip is {cfg['clip_seconds']:.2f} s):",
        "I_j = 10·log10(Σ_n w[n]·y[jL − ⌊L/2⌋ + n]² / Σ_n w[n]·1[in clip] + 1e-8), with w a periodic Hann window",
        "of 2L samples (L the latent hop) centred on frame j's samples: 20·log10 of the Hann-weighted frame RMS",
        f"(a full-scale sine reads −3 dB), floored softly at {cfg['intensity_floor_db']:.0f} dB. Every figure below is",
        "measured on the decoded waveform.",
        *(
            [
                "The control loss reads the same quantity from the mel code without decoding (METHOD §5b: the",
                "filterbank's pseudo-inverse gives linear magnitudes, Parseval over the Hann-windowed frame their",
                "RMS), so its gradient does not pass through phase reconstruction; it is the mean squared dB error",
                "to the target over the frames.",
            ]
            if mel
            else [
                "It is differentiable, and the control loss is the mean squared dB error to the target over the frames."
            ]
        ),
        "",
        "## Methods",
        "",
        (
            "- **(a) noise optimisation**: Adam on the unit initial noise ε_T through the γ = 0 sampler of the row's "
            "step count (at 1 step the one-step map"
            if cc.get("noise_through_sampler", False)
            else "- **(a) noise optimisation**: Adam on the unit initial noise ε_T through the one-step map ("
        ),
        f"  x_0 = G(σ_max·ε_T, σ_max, σ_min)){reader}, ε_T projected back to the sphere of radius √(C·T)",
        f"  after each step; {cc['noise_iterations']} iterations, step size {cc['noise_lr']}. Then deterministic",
        "  (γ = 0) sampling from the optimised noise with the row's step count.",
        "- **(b) loss guidance**: γ = 0 sampling where, before each jump from noise level t "
        f"(t ≥ {cc['guidance_min_t']}{t_max}),",
        f"  x_t is nudged {cc['guidance_iterations']} time(s), x_t ← x_t − ρ·t·∇/rms(∇) with ρ = {cc['guidance_rho']} "
        "and ∇ the gradient",
        f"  of the loss on {'the mel code' if mel else 'the decode'} of x̂_0 = G(x_t, t, σ_min).",
        (
            "- **Level**: both methods control the curve's *shape* (the loss ignores the mean dB error over the "
            "frames), then scale the result by that mean (at most ±30 dB). The `level_only` row is the "
            "uncontrolled take with the same kind of gain and no generative control: what a fader does."
            if cc.get("match_level")
            else "- **Level**: both methods reach the target's absolute level through the latent (no gain step)."
        ),
        (
            f"- **Timbre anchor** weight {cc['timbre_weight']}: the loss also keeps the long-term spectral shape of "
            + (
                "the uncontrolled take with the same step count."
                if cc.get("noise_through_sampler", False)
                else "the uncontrolled one-step take."
            )
            if cc.get("timbre_weight")
            else ""
        ),
        "",
        "Presets (relative to the clip duration D; linear in dB between points): `fade-in` "
        f"{cfg['preset_levels_db']['low']:g} → {cfg['preset_levels_db']['high']:g} dB; `decay` the reverse; "
        "`swell` low → high at D/2 → low; `pulse` four hits, each high at its onset and decaying to low.",
        "",
        "## Results",
        "",
        f"{cfg['prompts_used']} test prompts (one class label each) × {len(presets)} presets = {cfg['cases']} cases; "
        f"ω = {cfg['omega_used']}, ν = {cfg['nu']}, seed {cfg['seed']} (+ prompt index); embedding "
        f"{cfg['embedding_used']}; {cfg['torch_threads']} torch thread(s) on {cfg['machine']['processor'] or 'cpu'} "
        f"({cfg['machine']['cpus']} cores).",
        "",
        f"At {result['steps']} steps, the mean dB RMSE to the target: uncontrolled "
        f"**{result['uncontrolled_db_rmse']:.2f}**"
        + (f", level only **{result['level_only_db_rmse']:.2f}**" if "level_only_db_rmse" in result else "")
        + f", noise optimisation **{result['noise_optimisation_db_rmse']:.2f}**, "
        f"loss guidance **{result['loss_guidance_db_rmse']:.2f}**.",
        "",
        "| method | steps | dB RMSE mean [95 %] | median | "
        + " | ".join(presets)
        + " | better than uncontrolled | adherence | same class as uncontrolled | s/clip (batched) | × uncontrolled "
        "| s, one clip |",
        "|---|---|---|---|" + "---|" * len(presets) + "---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        better = "–" if r["better_than_uncontrolled"] is None else f"{100 * r['better_than_uncontrolled']:.0f} %"
        lines.append(
            f"| {r['method']} | {r['steps']} | {_ci(r['db_rmse'])} | {r['db_rmse']['median']:.2f} | "
            + " | ".join(f"{r['db_rmse_per_preset'][p]:.2f}" for p in presets)
            + f" | {better} | {r['adherence']:.3f} | {r['same_class_as_uncontrolled']:.3f} | "
            f"{r['seconds_per_clip']:.3f} | {r['time_vs_uncontrolled']:.1f} | {r['seconds_one_clip']:.2f} |"
        )
    corpora = list(result["rows"][0]["adherence_per_corpus"])
    lines += [
        "",
        "Adherence by preset and by corpus:",
        "",
        "| method | steps | " + " | ".join(presets + corpora) + " |",
        "|---|---|" + "---|" * (len(presets) + len(corpora)),
    ]
    for r in result["rows"]:
        vals = [r["adherence_per_preset"][x] for x in presets] + [r["adherence_per_corpus"][x] for x in corpora]
        lines.append(f"| {r['method']} | {r['steps']} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    lines += ["", "Adherence, paired with the uncontrolled take of the same case (exact McNemar test):", ""]
    for r in result["rows"]:
        if "adherence_paired" in r:
            a = r["adherence_paired"]
            lines.append(
                f"- {r['method']}, {r['steps']} step(s): {a['lost']} cases lost the prompt's class, "
                f"{a['gained']} gained it (p = {a['mcnemar_p']:.2f})"
            )
    p = result["probe"]
    lines += [
        "",
        f"Adherence: accuracy of a ridge probe ({p['classes']} classes, fitted on {cfg['embedding_used']} "
        f"embeddings of {p['train_clips']} real training clips, ridge {p['ridge']} chosen on the valid split) "
        f"predicting the prompt's class; on the real test clips it scores {p['accuracy_real_test']:.3f}. "
        '"Same class as uncontrolled": the probe gives the controlled clip the class it gives the '
        "uncontrolled take of the same noise.",
        "",
        f"Cost: seconds per clip in batches of {cfg['batch']} (sampling, control and {decoder} decode) and for one "
        "clip "
        "alone; each noise-optimisation row is charged its own optimisation"
        + (
            " (through its step count's sampler)."
            if cc.get("noise_through_sampler", False)
            else ", although one serves both step counts."
        )
        + f" The cases took {cfg['total_seconds'] / 60:.1f} min (after loading, without the probe).",
    ]
    if png_name:
        lines += ["", f"![target vs achieved intensity over spectrograms]({png_name})", ""]
        lines.append("Dashed white: target; cyan: the result's intensity (right axis, dBFS).")
    return "\n".join(lines) + "\n"
