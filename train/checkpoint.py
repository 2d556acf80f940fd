"""The model checkpoint that export reads: student (EMA) + latent codec + latent statistics + config, one file.

The codec (train.latent) is the fixed mel code (no weights: the config alone rebuilds it) or a VAE (its weights
under "vae.").

Training writes it at the end of distillation (fp16 by default); `export --init random` builds the same thing
from a freshly initialised architecture, so there is one export code path for both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .latent import Codec, build_codec, decode_latent, denormalise
from .models.config import ModelConfig
from .models.denoiser import CTMDenoiser
from .models.dit import DiT
from .models.text import TextEncoder
from .models.vae import VAE

FORMAT = "soundctm-rt-model/1"
STUDENT_CHECKPOINT = "student_model.safetensors"  # under a distillation run's final/: what `soundctm-rt export` reads
TEACHER_CHECKPOINT = "teacher_model.safetensors"  # under a teacher run's final/


@dataclass
class ModelSource:
    """Everything a bundle is exported from."""

    config: ModelConfig
    student: CTMDenoiser
    codec: Codec  # train.latent: MelCodec or VAE
    text: TextEncoder
    latent_mean: torch.Tensor  # [C]: METHOD §5, z' = 0.5·(z - μ)/std
    latent_std: torch.Tensor  # [C]
    provenance: dict[str, Any] = field(default_factory=dict)

    def denormalise(self, x0: torch.Tensor) -> torch.Tensor:
        """Normalised latent [B, C, T] -> the codec's raw latent (METHOD §5)."""
        return denormalise(x0, self.latent_mean, self.latent_std)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Normalised latent [B, C, T] -> waveform [B, T·hop] (no gradient through a mel code's phase)."""
        return decode_latent(self.codec, x0, self.latent_mean, self.latent_std)


def build_networks(cfg: ModelConfig) -> tuple[TextEncoder, CTMDenoiser, Codec]:
    """Fresh text encoder (pretrained or seeded), student/teacher network and latent codec of an architecture."""
    text = TextEncoder(cfg.text)
    net = DiT(cfg.dit, cfg.latent_channels, text.hidden_size)
    return text, CTMDenoiser(net, cfg.edm.sigma_data), build_codec(cfg)


def perturb_zero_init(module: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Give zero-initialised layers (adaLN, output) small random weights, so that a randomly initialised
    model computes something non-trivial: parity checks and timings on it then mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.numel() and bool((p == 0).all()):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def init_random(cfg: ModelConfig, seed: int = 0) -> ModelSource:
    """A freshly initialised model of an architecture (for `export --init random`)."""
    torch.manual_seed(seed)
    text, student, codec = build_networks(cfg)
    perturb_zero_init(student, seed)
    c = cfg.latent_channels
    return ModelSource(
        cfg,
        student.eval(),
        codec.eval(),
        text,
        torch.zeros(c),
        torch.ones(c),
        {"init": "random", "seed": seed, "config": cfg.name},
    )


def save_model_checkpoint(path: str | Path, src: ModelSource, dtype: torch.dtype = torch.float16) -> Path:
    """Write a ModelSource (without the frozen text encoder, which is rebuilt from its config)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for prefix, mod in (("student.", src.student.net), ("vae.", src.codec)):
        for k, v in mod.state_dict().items():
            tensors[prefix + k] = v.detach().to(dtype).contiguous() if v.is_floating_point() else v.contiguous()
    tensors["latent_mean"] = src.latent_mean.float().contiguous()
    tensors["latent_std"] = src.latent_std.float().contiguous()
    meta = {
        "format": FORMAT,
        "config": json.dumps(src.config.to_dict()),
        "provenance": json.dumps(src.provenance),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def load_model_checkpoint(path: str | Path) -> ModelSource:
    """Read a checkpoint written by save_model_checkpoint, weights cast to float32."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors checkpoint ({e})") from e
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a soundctm-rt model checkpoint (format {meta.get('format')!r}, "
            f"expected {FORMAT!r}); export takes the final checkpoint of `train distill`"
        )
    cfg = ModelConfig.from_dict(json.loads(meta["config"]))
    text, student, codec = build_networks(cfg)

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {
            k[len(prefix) :]: v.float() if v.is_floating_point() else v
            for k, v in tensors.items()
            if k.startswith(prefix)
        }

    student.net.load_state_dict(part("student."))
    codec.load_state_dict(part("vae."))
    return ModelSource(
        cfg,
        student.eval(),
        codec.eval(),
        text,
        tensors["latent_mean"].float(),
        tensors["latent_std"].float(),
        json.loads(meta.get("provenance", "{}")),
    )


def swap_vae(
    src: ModelSource,
    vae: VAE,
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    provenance: dict[str, Any],
    atol: float = 1e-3,
) -> ModelSource:
    """The same student with another VAE that shares its latent space (e.g. a `train vae-decoder` run).

    Refused unless the encoders agree (to `atol`, which absorbs the fp16 storage of a checkpoint) and the
    latent statistics μ_c, std_c (METHOD §5) match to 1e-4 relative: a different latent space would make the
    student's output meaningless to the new decoder.
    """
    if not isinstance(src.codec, VAE):
        raise ValueError("the checkpoint's latent is the mel code, not a VAE: there is no decoder to swap")
    if vae.cfg != src.config.vae:
        raise ValueError(f"the VAE's config {vae.cfg} is not the checkpoint's {src.config.vae}")
    new_enc = vae.encoder.state_dict()
    for name, old in src.codec.encoder.state_dict().items():
        if not torch.allclose(old.float(), new_enc[name].float(), atol=atol, rtol=0):
            raise ValueError(f"encoder tensor {name} differs: the VAE does not share the checkpoint's latent space")
    for name, old, new in (("latent_mean", src.latent_mean, latent_mean), ("latent_std", src.latent_std, latent_std)):
        if not torch.allclose(old.float(), new.float(), rtol=1e-4, atol=1e-6):
            raise ValueError(f"{name} differs: the VAE does not share the checkpoint's latent statistics")
    return ModelSource(
        src.config,
        src.student,
        vae.eval(),
        src.text,
        src.latent_mean,
        src.latent_std,
        {**src.provenance, "vae_swap": provenance},
    )
