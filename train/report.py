"""Reconstruction metrics of a VAE on a split, a no-training baseline, and spectrogram PNGs.

Metrics per clip, averaged over the split (waveforms at the model rate):
  * MR-STFT distance: losses.mr_stft_loss (spectral convergence + log-magnitude L1, 5 resolutions);
  * mel L1: losses.mel_l1 (natural-log mel magnitudes, 3 scales);
  * SI-SDR in dB (phase-sensitive: an STFT-domain decoder that gets the spectrum right can still score low).
Each is taken on the whole clip and, as `*_sounding`, on the part that holds the source file's audio (at least
8192 samples): zero-padded one-shots otherwise score mostly how exactly a decoder reproduces digital silence,
which the log-magnitude terms (floor 1e-5, −100 dB) weigh as much as the sound itself.

Baselines that need no training (../shared/data/README.md asks that a learned VAE beat them before adoption):
  * `mel128_griffin_lim32`: 128-bin mel magnitudes (n_fft 2048, hop 512) -> filterbank pseudo-inverse ->
    32 Griffin-Lim iterations. It keeps 8x more numbers per second than a 32-channel latent at 43 Hz;
  * `mel_pca<k>_griffin_lim32`: the same, but each log-mel frame is reduced to its first k principal components
    (fitted in closed form on training clips), with k chosen so the baseline keeps as many numbers per
    second as the VAE latent (k = latent_channels · 512 / latent_hop).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import ClipDataset
from .losses import MAG_EPS, log_mel, mel_filterbank, mel_l1, mr_stft_loss, si_sdr

logger = logging.getLogger(__name__)


MIN_SOUNDING = 8192  # samples: the shortest region the 4096-point STFT of the metric can analyse


def clip_metrics(
    y_hat: torch.Tensor, y: torch.Tensor, sample_rate: int, n_valid: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Per-clip metrics of reconstructions y_hat [B, N] against originals y [B, N]; with n_valid [B] (samples
    of real audio per clip) also the `*_sounding` metrics over y[:max(n_valid, MIN_SOUNDING)]."""
    out: dict[str, list[float]] = {}
    for i in range(y.shape[0]):
        regions = {"": y.shape[-1]}
        if n_valid is not None:
            regions["_sounding"] = min(y.shape[-1], max(int(n_valid[i]), MIN_SOUNDING))
        for suffix, n in regions.items():
            a, b = y_hat[i : i + 1, :n], y[i : i + 1, :n]
            out.setdefault("mr_stft" + suffix, []).append(float(mr_stft_loss(a, b)))
            out.setdefault("mel_l1" + suffix, []).append(float(mel_l1(a, b, sample_rate)))
            out.setdefault("si_sdr_db" + suffix, []).append(float(si_sdr(a, b)[0]))
    return {k: np.array(v) for k, v in out.items()}


def griffin_lim_from_mel(
    y: torch.Tensor,
    sample_rate: int,
    n_fft: int = 2048,
    hop: int = 512,
    n_mels: int = 128,
    iters: int = 32,
    seed: int = 0,
) -> torch.Tensor:
    """The no-training baseline: mel magnitudes -> pseudo-inverse -> Griffin-Lim. [B, N] -> [B, N]."""
    fb = mel_filterbank(sample_rate, n_fft, n_mels)
    win = torch.hann_window(n_fft)
    X = torch.stft(y, n_fft, hop, window=win, center=True, return_complex=True)
    mel = fb @ X.abs()
    mag = (torch.linalg.pinv(fb) @ mel).clamp(min=0.0)
    g = torch.Generator().manual_seed(seed)
    phase = torch.exp(2j * torch.pi * torch.rand(mag.shape, generator=g))
    S = mag * phase
    for _ in range(iters):
        x = torch.istft(S, n_fft, hop, window=win, center=True, length=y.shape[-1])
        S = mag * torch.exp(1j * torch.angle(torch.stft(x, n_fft, hop, window=win, center=True, return_complex=True)))
    return torch.istft(S, n_fft, hop, window=win, center=True, length=y.shape[-1])


def _griffin_lim(mag: torch.Tensor, n_fft: int, hop: int, length: int, iters: int, seed: int) -> torch.Tensor:
    """Griffin-Lim from linear magnitudes [B, bins, frames] -> [B, length]."""
    win = torch.hann_window(n_fft)
    g = torch.Generator().manual_seed(seed)
    S = mag * torch.exp(2j * torch.pi * torch.rand(mag.shape, generator=g))
    for _ in range(iters):
        x = torch.istft(S, n_fft, hop, window=win, center=True, length=length)
        X = torch.stft(x, n_fft, hop, window=win, center=True, return_complex=True)
        S = mag * torch.exp(1j * torch.angle(X))
    return torch.istft(S, n_fft, hop, window=win, center=True, length=length)


class MelPCA:
    """Log-mel frames (128 bins, n_fft 2048, hop 512) reduced to k principal components, fitted in closed
    form on up to `clips` training clips; reconstruct = project, back to mel, pseudo-inverse, Griffin-Lim."""

    n_fft, hop, n_mels = 2048, 512, 128

    def __init__(self, ds: ClipDataset, k: int, clips: int = 256, seed: int = 0) -> None:
        self.sr = ds.sample_rate
        self.k = k
        idx = ds.indices("train")
        idx = np.random.default_rng(seed).permutation(idx)[:clips]
        frames = torch.cat([self._log_mel(torch.from_numpy(ds.wave(idx[i : i + 32]))) for i in range(0, len(idx), 32)])
        frames = frames.transpose(1, 2).reshape(-1, self.n_mels).double()  # [frames, n_mels]
        self.mean = frames.mean(0)
        _, _, vt = torch.linalg.svd(frames - self.mean, full_matrices=False)
        self.basis = vt[:k]  # [k, n_mels]

    def _log_mel(self, y: torch.Tensor) -> torch.Tensor:
        return log_mel(y, self.sr, self.n_fft, self.hop, self.n_mels)

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        m = self._log_mel(y).transpose(1, 2).double()  # [B, F, n_mels]
        rec = ((m - self.mean) @ self.basis.T) @ self.basis + self.mean
        mel = (torch.exp(rec) - MAG_EPS).clamp(min=0.0).transpose(1, 2).float()
        fb = mel_filterbank(self.sr, self.n_fft, self.n_mels)
        mag = (torch.linalg.pinv(fb) @ mel).clamp(min=0.0)
        return _griffin_lim(mag, self.n_fft, self.hop, y.shape[-1], 32, 0)


def pick_examples(ds: ClipDataset, idx: np.ndarray, k: int) -> np.ndarray:
    """k clips of a split spread evenly over its corpora (round robin), deterministic."""
    by_corpus: dict[str, list[int]] = {}
    for i in idx:
        by_corpus.setdefault(ds.rows[int(i)]["corpus"], []).append(int(i))
    per = [np.array(v)[np.linspace(0, len(v) - 1, min(len(v), k)).round().astype(int)] for v in by_corpus.values()]
    out: list[int] = []
    j = 0
    while len(out) < min(k, len(idx)):
        for p in per:
            if j < len(p) and len(out) < k:
                out.append(int(p[j]))
        j += 1
    return np.array(sorted(set(out)), dtype=np.int64)


def save_spectrograms(
    rows: Sequence[Sequence[np.ndarray]],
    row_titles: Sequence[str],
    col_titles: Sequence[str],
    path: Path,
    sample_rate: int,
) -> Path:
    """A grid of log-mel spectrograms (rows × columns of waveforms [N]) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nr, nc = len(rows), len(rows[0])
    fig, axes = plt.subplots(nr, nc, figsize=(4.2 * nc, 1.9 * nr), squeeze=False)
    for r, row in enumerate(rows):
        dbs = [
            20.0
            / np.log(10.0)
            * log_mel(torch.from_numpy(np.asarray(w, dtype=np.float32))[None], sample_rate, 2048, 256, 128)[0].numpy()
            for w in row
        ]
        vmax = max(-40.0, max(float(d.max()) for d in dbs))  # one colour scale per row: compare like with like
        for c, (wav, db) in enumerate(zip(row, dbs, strict=True)):
            ax = axes[r][c]
            ax.imshow(
                db,
                origin="lower",
                aspect="auto",
                vmin=vmax - 80.0,
                vmax=vmax,
                cmap="magma",
                extent=(0.0, len(wav) / sample_rate, 0, 128),
            )
            ax.set_title(f"{col_titles[c]}: {row_titles[r]}"[:70], fontsize=7)
            ax.tick_params(labelsize=6)
            if c == 0:
                ax.set_ylabel("mel bin", fontsize=6)
    for ax in axes[-1]:
        ax.set_xlabel("s", fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


@torch.no_grad()
def reconstruction_report(
    reconstruct: Callable[[torch.Tensor], torch.Tensor],
    ds: ClipDataset,
    split: str,
    out_dir: Path,
    batch: int = 16,
    n_png: int = 8,
    baseline: bool = True,
    pca_components: int = 16,
) -> dict[str, Any]:
    """Metrics of `reconstruct` ([B, N] -> [B, N]) on a split, the no-training baselines (module docstring;
    pca_components = latent_channels · 512 / latent_hop, 16 for the 32-channel 1024-hop VAE), a PNG and WAV pairs.
    """
    import soundfile as sf

    idx = ds.indices(split)
    if len(idx) == 0:
        raise ValueError(f"split {split!r} of {ds.root} is empty")
    sr = ds.sample_rate
    methods: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"vae": reconstruct}
    if baseline:
        methods["baseline_mel128_griffin_lim32"] = lambda y: griffin_lim_from_mel(y, sr)
        methods[f"baseline_mel_pca{pca_components}_griffin_lim32"] = MelPCA(ds, pca_components)
    acc: dict[str, dict[str, list[np.ndarray]]] = {name: {} for name in methods}
    corpus = np.array([ds.rows[int(i)]["corpus"] for i in idx])
    for i in range(0, len(idx), batch):
        y = torch.from_numpy(ds.wave(idx[i : i + batch]))
        n_valid = ds.n_valid[idx[i : i + batch]]
        for name, fn in methods.items():
            for k, v in clip_metrics(fn(y), y, sr, n_valid).items():
                acc[name].setdefault(k, []).append(v)

    def summarise(d: dict[str, list[np.ndarray]]) -> dict[str, Any]:
        arr = {k: np.concatenate(v) for k, v in d.items()}
        res: dict[str, Any] = {k: float(v.mean()) for k, v in arr.items()}
        res["by_corpus"] = {c: {k: float(v[corpus == c].mean()) for k, v in arr.items()} for c in sorted(set(corpus))}
        return res

    report: dict[str, Any] = {"split": split, "clips": len(idx)}
    report.update({name: summarise(d) for name, d in acc.items()})
    out_dir.mkdir(parents=True, exist_ok=True)
    ex = pick_examples(ds, idx, n_png)
    y = torch.from_numpy(ds.wave(ex))
    y_hat = reconstruct(y)
    titles = [ds.rows[int(i)]["caption"] for i in ex]
    save_spectrograms(
        [[y[j].numpy(), y_hat[j].numpy()] for j in range(len(ex))],
        titles,
        ["original", "reconstruction"],
        out_dir / f"{split}_spectrograms.png",
        sr,
    )
    for j in range(len(ex)):
        sf.write(out_dir / f"{split}_{j}_orig.wav", y[j].numpy(), sr)
        sf.write(out_dir / f"{split}_{j}_recon.wav", y_hat[j].numpy(), sr)
    report["examples"] = [{"index": int(i), "caption": t} for i, t in zip(ex, titles, strict=True)]
    (out_dir / f"{split}_metrics.json").write_text(json.dumps(report, indent=2))
    logger.info("reconstruction on %s: %s", split, {k: v for k, v in report["vae"].items() if k != "by_corpus"})
    return report
