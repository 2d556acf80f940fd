"""A VAE run directory: what `train vae` and `train vae-decoder` write, and what every later stage reads.

final/vae.safetensors (fp32, the model config in its metadata; its sha names the latent cache), the latent cache
of the dataset (data.cache_latents), the per-channel statistics μ_c, std_c over the *training* clips' latent
frames in final/latent_stats.safetensors (METHOD §5: z' = 0.5·(z − μ_c)/std_c), and report/ (the test split's
reconstruction report). During training: validation reconstructions under samples/vae_<step>/.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import ClipDataset, cache_latents
from .loop import RunDir, save_safetensors
from .models.config import ModelConfig
from .models.vae import VAE

logger = logging.getLogger(__name__)

VALIDATION_SKIPPED = "no validation reconstructions"
REPORT_SKIPPED = "no reconstruction report (report/test_metrics.json)"


def file_id(path: Path) -> str:
    """First 12 hex digits of a file's sha256 (names the latent cache of a VAE)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def load_vae_run(run: str | Path) -> tuple[VAE, ModelConfig, str]:
    """The final fp32 VAE of a run directory, its model config and its id (sha of the weights)."""
    from safetensors import safe_open

    path = Path(run) / "final" / "vae.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run} a finished `train vae` run?")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    cfg = ModelConfig.from_dict(json.loads(meta["config"]))
    vae = VAE(cfg.vae)
    vae.load_state_dict(sd)
    return vae.eval(), cfg, file_id(path)


def load_latent_stats(run: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ_c, std_c) [C] of a finished VAE run (METHOD §5)."""
    from safetensors.torch import load_file

    path = Path(run) / "final" / "latent_stats.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not finalised: run `train vae-finalize --run RUN --data DATA`")
    t = load_file(str(path))
    return t["latent_mean"], t["latent_std"]


def save_vae(rd: RunDir, vae: VAE, meta: dict[str, Any]) -> None:
    """final/vae.safetensors (fp32) and final/vae_fp16.safetensors of a VAE on the CPU."""
    save_safetensors(rd.final / "vae.safetensors", vae.state_dict(), meta)
    save_safetensors(rd.final / "vae_fp16.safetensors", vae.state_dict(), meta, dtype=torch.float16)


@torch.no_grad()
def validate_reconstructions(vae: VAE, ds: ClipDataset, rd: RunDir, step: int, n: int) -> None:
    """Validation reconstructions of up to n clips: metrics in the log, WAV pairs under samples/vae_<step>/."""
    import soundfile as sf

    from .report import clip_metrics

    idx = ds.indices("valid")[:n]
    if len(idx) == 0:
        return
    vae.eval()
    y = torch.from_numpy(ds.wave(idx))
    y_hat = vae.decode(vae.encode(y)[0])
    m = clip_metrics(y_hat, y, ds.sample_rate)
    rd.log({"step": step, **{f"valid_{k}": float(v.mean()) for k, v in m.items()}})
    out = rd.samples / f"vae_{step:07d}"
    out.mkdir(parents=True, exist_ok=True)
    for j in range(min(4, len(idx))):
        sf.write(out / f"{j}_orig.wav", y[j].numpy(), ds.sample_rate)
        sf.write(out / f"{j}_recon.wav", y_hat[j].numpy(), ds.sample_rate)


def finalize_vae(run: str | Path, ds: ClipDataset, report: bool = True) -> dict[str, Any]:
    """Cache the dataset's latents, compute per-channel statistics over training clips, write the report (not
    when the dataset has no test clips: the callers said so when they started)."""
    run = Path(run)
    vae, cfg, vae_id = load_vae_run(run)
    lat = np.load(cache_latents(ds, vae, vae_id), mmap_mode="r")
    train = np.asarray(lat[ds.indices("train")], dtype=np.float64)  # [n, C, T]
    mu = train.mean(axis=(0, 2))
    std = train.std(axis=(0, 2))
    std = np.maximum(std, 1e-6)  # METHOD §5: z' = 0.5·(z − μ_c)/std_c
    save_safetensors(
        run / "final" / "latent_stats.safetensors",
        {"latent_mean": torch.from_numpy(mu).float(), "latent_std": torch.from_numpy(std).float()},
        {"vae_id": vae_id, "clips": str(train.shape[0])},
    )
    (run / "final" / "latent_stats.json").write_text(
        json.dumps({"vae_id": vae_id, "latent_mean": mu.tolist(), "latent_std": std.tolist()}, indent=1)
    )
    logger.info(
        "latent stats over %d training clips: |mean| %.3f, std range %.3f..%.3f",
        train.shape[0],
        float(np.abs(mu).mean()),
        float(std.min()),
        float(std.max()),
    )
    out: dict[str, Any] = {"vae_id": vae_id}
    if report and len(ds.indices("test")):
        from .report import MelPCA, reconstruction_report

        # the PCA baseline keeps as many numbers per second as the latent (report module docstring)
        k = max(1, round(cfg.vae.latent_channels * MelPCA.hop / cfg.vae.latent_hop))
        with torch.no_grad():
            out["report"] = reconstruction_report(
                lambda y: vae.decode(vae.encode(y)[0]), ds, "test", run / "report", pca_components=k
            )
    return out
