"""The bundle manifest as a typed contract: `Manifest.from_dict` reads `manifest.json` once and refuses any shape
the runtime could not use, naming the field and the fix.

Only what the runtime reads is typed here (the sections below); reports the runtime merely displays (parity,
export options, provenance, compression) stay free-form in the raw manifest. The export writes the typed sections
through the same classes (`to_dict`), so what is written is what is read. Every file a section names must be in
the `files` table, so `Bundle.check_files` verifies it at load and a missing graph is found before it is needed.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

SCHEMA = "soundctm-rt-bundle"
SCHEMA_VERSION = 1
BACKENDS = ("onnxruntime", "openvino")
LATENT_KINDS = ("mel", "vae")
# the graphs the engine runs for each latent kind (mel latents are decoded on the host)
REQUIRED_GRAPHS = {
    "mel": ("text_encoder", "student_step"),
    "vae": ("text_encoder", "student_step", "vae_decoder", "vae_decoder_stream"),
}
# METHOD §5/§5b: how the stored latent relates to the code the decoder reads, per latent kind
NORMALISATION = {
    "mel": "z' = 0.5*(z - mean)/std; the host decodes z = 2*std*z' + mean (METHOD 5b)",
    "vae": "z' = 0.5*(z - mean)/std; decode z = 2*std*z' + mean (inside the decoder graphs)",
}
_SHA256 = re.compile(r"[0-9a-f]{64}")


class BundleError(Exception):
    """A bundle that cannot be used, with what went wrong and what to do about it."""


def _corrupt(where: str, what: str) -> BundleError:
    return BundleError(f"{where}: {what}; the bundle is corrupt or was edited by hand, re-export it")


def _kind(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _obj(v: Any, name: str, where: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _corrupt(where, f"'{name}' must be an object, not {_kind(v)}")
    return v


def _need(d: dict[str, Any], key: str, section: str, where: str) -> Any:
    if key not in d:
        raise _corrupt(where, f"'{section}' lacks '{key}'")
    return d[key]


def _int(d: dict[str, Any], key: str, section: str, where: str, lo: int = 0) -> int:
    v = _need(d, key, section, where)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise _corrupt(where, f"'{section}.{key}' must be an integer >= {lo}, not {v!r}")
    return v


def _float(d: dict[str, Any], key: str, section: str, where: str) -> float:
    v = _need(d, key, section, where)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _corrupt(where, f"'{section}.{key}' must be a finite number, not {v!r}")
    return float(v)


def _str(d: dict[str, Any], key: str, section: str, where: str) -> str:
    v = _need(d, key, section, where)
    if not isinstance(v, str) or not v:
        raise _corrupt(where, f"'{section}.{key}' must be a non-empty string, not {v!r}")
    return v


def _rel_path(v: Any, name: str, where: str) -> str:
    """A path inside the bundle: relative, no '..' (a manifest must not point the runtime elsewhere)."""
    if not isinstance(v, str) or not v:
        raise _corrupt(where, f"'{name}' must be a file path, not {v!r}")
    p = PurePosixPath(v)
    if p.is_absolute() or ".." in p.parts or "\\" in v:
        raise _corrupt(where, f"'{name}' ({v}) must be a relative path inside the bundle")
    return v


def _path_map(v: Any, name: str, where: str) -> dict[str, str]:
    """{backend: relative path} with known backends only."""
    d = _obj(v, name, where)
    for backend, rel in d.items():
        if backend not in BACKENDS:
            raise _corrupt(where, f"'{name}' names backend {backend!r}; this runtime has {list(BACKENDS)}")
        _rel_path(rel, f"{name}.{backend}", where)
    return dict(d)


def _floats(d: dict[str, Any], key: str, section: str, where: str) -> tuple[float, ...]:
    v = _need(d, key, section, where)
    if not isinstance(v, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise _corrupt(where, f"'{section}.{key}' must be a list of numbers")
    return tuple(float(x) for x in v)


@dataclass(frozen=True)
class FileEntry:
    """One file of the bundle as recorded at export: its sha256 (hex) and size in bytes."""

    sha256: str
    bytes: int

    @classmethod
    def from_dict(cls, rel: str, v: Any, where: str) -> FileEntry:
        d = _obj(v, f"files.{rel}", where)
        sha = _need(d, "sha256", f"files.{rel}", where)
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise _corrupt(where, f"'files.{rel}.sha256' must be 64 lowercase hex digits, not {sha!r}")
        return cls(sha, _int(d, "bytes", f"files.{rel}", where))


@dataclass(frozen=True)
class AudioSpec:
    sample_rate: int  # Hz
    channels: int

    def to_dict(self) -> dict[str, Any]:
        return {"sample_rate": self.sample_rate, "channels": self.channels}

    @classmethod
    def from_dict(cls, v: Any, where: str) -> AudioSpec:
        d = _obj(v, "audio", where)
        return cls(_int(d, "sample_rate", "audio", where, lo=1), _int(d, "channels", "audio", where, lo=1))


@dataclass(frozen=True)
class LatentSpec:
    """The latent the student samples: [1, channels, frames], `hop` audio samples per frame, and how to decode it.

    "mel" carries its normalisation statistics and log-mel code (`mel`, read by melcode.MelCodeConfig); "vae" its
    decoder graphs' context (frames of padding each side of a streaming window).
    """

    kind: str
    channels: int
    frames: int
    hop: int
    frame_rate: float  # frames per second
    mean: tuple[float, ...]
    std: tuple[float, ...]
    mel: dict[str, Any] | None
    decoder_context: int | None
    stream_chunk: int | None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "kind": self.kind,
            "channels": self.channels,
            "frames": self.frames,
            "frame_rate": self.frame_rate,
            "hop": self.hop,
            "mean": list(self.mean),
            "std": list(self.std),
            "normalisation": NORMALISATION[self.kind],
        }
        if self.mel is not None:
            d["mel"] = dict(self.mel)
        if self.decoder_context is not None:
            d["decoder_context"] = self.decoder_context
        if self.stream_chunk is not None:
            d["stream_chunk"] = self.stream_chunk
        return d

    @classmethod
    def from_dict(cls, v: Any, where: str) -> LatentSpec:
        d = _obj(v, "latent", where)
        kind = d.get("kind", "vae")  # a latent without a kind is a VAE latent
        if kind not in LATENT_KINDS:
            raise BundleError(
                f"{where}: latent kind {kind!r} is unknown to this runtime (it reads {list(LATENT_KINDS)})"
            )
        need = {"mel": ("mean", "std", "mel"), "vae": ("decoder_context",)}[kind]
        missing = [k for k in ("channels", "frames", "hop", "frame_rate", *need) if k not in d]
        if missing:
            raise _corrupt(where, f"the {kind} latent lacks {missing}")
        channels = _int(d, "channels", "latent", where, lo=1)
        mean = _floats(d, "mean", "latent", where) if "mean" in d else ()
        std = _floats(d, "std", "latent", where) if "std" in d else ()
        mel = _obj(d["mel"], "latent.mel", where) if kind == "mel" else None
        if mel is not None and (len(mean) != channels or len(std) != channels or mel.get("n_mels") != channels):
            raise _corrupt(where, f"the mel latent's statistics or bins do not match its {channels} channels")
        return cls(
            kind=kind,
            channels=channels,
            frames=_int(d, "frames", "latent", where, lo=1),
            hop=_int(d, "hop", "latent", where, lo=1),
            frame_rate=_float(d, "frame_rate", "latent", where),
            mean=mean,
            std=std,
            mel=mel,
            decoder_context=_int(d, "decoder_context", "latent", where) if kind == "vae" else None,
            stream_chunk=_int(d, "stream_chunk", "latent", where, lo=1) if "stream_chunk" in d else None,
        )


@dataclass(frozen=True)
class EdmSpec:
    """The EDM noise schedule the student was distilled on (METHOD §2)."""

    sigma_min: float
    sigma_max: float
    rho: float
    sigma_data: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, v: Any, where: str) -> EdmSpec:
        d = _obj(v, "edm", where)
        spec = cls(*(_float(d, k, "edm", where) for k in ("sigma_min", "sigma_max", "rho", "sigma_data")))
        if not 0.0 < spec.sigma_min < spec.sigma_max or spec.rho <= 0.0:
            raise _corrupt(where, "'edm' needs 0 < sigma_min < sigma_max and rho > 0")
        return spec


@dataclass(frozen=True)
class GuidanceSpec:
    """The ω range the student was trained on and the defaults of a request."""

    omega_min: float
    omega_max: float
    default_omega: float
    default_nu: float
    default_gamma: float
    default_steps: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, v: Any, where: str) -> GuidanceSpec:
        d = _obj(v, "guidance", where)
        spec = cls(
            omega_min=_float(d, "omega_min", "guidance", where),
            omega_max=_float(d, "omega_max", "guidance", where),
            default_omega=_float(d, "default_omega", "guidance", where),
            default_nu=_float(d, "default_nu", "guidance", where),
            default_gamma=_float(d, "default_gamma", "guidance", where),
            default_steps=_int(d, "default_steps", "guidance", where, lo=1),
        )
        if spec.omega_min > spec.omega_max:
            raise _corrupt(where, "'guidance' has omega_min > omega_max")
        return spec


@dataclass(frozen=True)
class TextSpec:
    encoder: str
    tokenizer: str  # relative path of the tokenizers-library JSON file
    max_length: int  # tokens the text encoder reads; longer prompts are cut
    hidden: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, v: Any, where: str) -> TextSpec:
        d = _obj(v, "text", where)
        return cls(
            encoder=_str(d, "encoder", "text", where),
            tokenizer=_rel_path(_need(d, "tokenizer", "text", where), "text.tokenizer", where),
            max_length=_int(d, "max_length", "text", where, lo=1),
            hidden=_int(d, "hidden", "text", where, lo=1),
        )


@dataclass(frozen=True)
class GraphSpec:
    """One graph: its file per backend and its I/O contract."""

    name: str
    files: dict[str, str]  # backend -> path relative to the bundle
    weights: dict[str, str]  # backend -> shared weights file (relative), if any
    inputs: list[dict[str, Any]]  # {"name", "shape", "dtype"}; a shape entry is an int or a dim name
    outputs: list[dict[str, Any]]
    attrs: dict[str, Any]  # graph-specific facts (steps, sigmas, chunk, ...)

    def input_names(self) -> list[str]:
        return [i["name"] for i in self.inputs]

    def referenced_files(self) -> list[str]:
        return [*self.files.values(), *self.weights.values()]

    def to_dict(self) -> dict[str, Any]:
        """The graph's entry under `graphs.<name>` (the name is its key)."""
        return {"files": self.files, "weights": self.weights, "inputs": self.inputs, "outputs": self.outputs,
                "attrs": self.attrs}  # fmt: skip

    @classmethod
    def from_dict(cls, name: str, v: Any, where: str) -> GraphSpec:
        sec = f"graphs.{name}"
        d = _obj(v, sec, where)
        files = _path_map(_need(d, "files", sec, where), f"{sec}.files", where)
        if not files:
            raise _corrupt(where, f"'{sec}.files' names no file")
        return cls(
            name=name,
            files=files,
            weights=_path_map(d.get("weights", {}), f"{sec}.weights", where),
            inputs=_io_list(_need(d, "inputs", sec, where), f"{sec}.inputs", where),
            outputs=_io_list(_need(d, "outputs", sec, where), f"{sec}.outputs", where),
            attrs=_obj(d.get("attrs", {}), f"{sec}.attrs", where),
        )


def _io_list(v: Any, name: str, where: str) -> list[dict[str, Any]]:
    if not isinstance(v, list):
        raise _corrupt(where, f"'{name}' must be a list, not {_kind(v)}")
    for i, t in enumerate(v):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not isinstance(t.get("shape"), list):
            raise _corrupt(where, f"'{name}[{i}]' must be an object with a 'name' and a 'shape' list")
    return v


@dataclass(frozen=True)
class Int8Variant:
    """An INT8 copy of a graph and its measured loss against the float graph.

    `files` maps a backend to the variant's graph file and `weights` to the shared weights file it reads; bundles
    made before per-backend variants name one onnxruntime graph in `file` (read as files = {onnxruntime: file}).
    """

    files: dict[str, str]
    weights: dict[str, str]
    quality: dict[str, Any]

    @property
    def file(self) -> str:
        """The onnxruntime variant (every bundle with INT8 variants has one)."""
        return self.files["onnxruntime"]

    def referenced_files(self) -> list[str]:
        return [*self.files.values(), *self.weights.values()]

    @classmethod
    def from_dict(cls, graph: str, v: Any, where: str) -> Int8Variant:
        sec = f"int8.{graph}"
        d = _obj(v, sec, where)
        if "files" in d:
            files = _path_map(d["files"], f"{sec}.files", where)
        else:
            files = {"onnxruntime": _rel_path(_need(d, "file", sec, where), f"{sec}.file", where)}
        if "onnxruntime" not in files:
            raise _corrupt(where, f"'{sec}.files' has no onnxruntime variant")
        return cls(
            files=files,
            weights=_path_map(d.get("weights", {}), f"{sec}.weights", where),
            quality=_obj(d.get("quality", {}), f"{sec}.quality", where),
        )


@dataclass(frozen=True)
class KnownPromptsSpec:
    """The captions the model was trained on (known_prompts.py) and the cosine below which a prompt is far."""

    file: str
    embeddings: str
    threshold: float

    @classmethod
    def from_dict(cls, v: Any, where: str) -> KnownPromptsSpec:
        d = _obj(v, "known_prompts", where)
        return cls(
            file=_rel_path(_need(d, "file", "known_prompts", where), "known_prompts.file", where),
            embeddings=_rel_path(_need(d, "embeddings", "known_prompts", where), "known_prompts.embeddings", where),
            threshold=_float(d, "threshold", "known_prompts", where),
        )


@dataclass(frozen=True)
class LicenseSpec:
    component: str
    name: str
    license: str
    source: str
    file: str | None  # the licence text inside the bundle, if shipped

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.file is None:
            del d["file"]
        return d

    @classmethod
    def from_dict(cls, i: int, v: Any, where: str) -> LicenseSpec:
        sec = f"licenses[{i}]"
        d = _obj(v, sec, where)
        return cls(
            component=_str(d, "component", sec, where),
            name=_str(d, "name", sec, where),
            license=_str(d, "license", sec, where),
            source=_str(d, "source", sec, where),
            file=_rel_path(d["file"], f"{sec}.file", where) if "file" in d else None,
        )


@dataclass(frozen=True)
class Manifest:
    """What the runtime reads from `manifest.json`, checked once. `files` maps every relative path to its entry."""

    schema_version: int
    model_name: str | None
    audio: AudioSpec
    latent: LatentSpec
    edm: EdmSpec
    guidance: GuidanceSpec
    text: TextSpec
    graphs: dict[str, GraphSpec]
    fused_steps: tuple[int, ...]
    int8: dict[str, Int8Variant]
    known_prompts: KnownPromptsSpec | None
    licenses: tuple[LicenseSpec, ...]
    extra_files: tuple[str, ...]
    files: dict[str, FileEntry]

    @classmethod
    def from_dict(cls, v: Any, where: str) -> Manifest:
        """Read a decoded manifest; `where` names it in errors. Raises BundleError with what is wrong."""
        if not isinstance(v, dict) or v.get("schema") != SCHEMA:
            schema = v.get("schema") if isinstance(v, dict) else None
            raise BundleError(
                f"{where} is not a soundctm-rt manifest (a JSON {_kind(v)}, schema {schema!r}): "
                "point --bundle at a folder made by `soundctm-rt export`"
            )
        version = v.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(
                f"{where} has schema version {version}, this runtime reads version {SCHEMA_VERSION}: "
                "upgrade soundctm-rt or re-export the bundle with this version"
            )
        for key in ("model", "graphs", "files", "latent", "edm", "guidance", "audio", "text"):
            if key not in v:
                raise _corrupt(where, f"it lacks the '{key}' section")
        model = _obj(v["model"], "model", where)
        name = model.get("name")
        latent = LatentSpec.from_dict(v["latent"], where)
        graphs = {str(n): GraphSpec.from_dict(str(n), g, where) for n, g in _obj(v["graphs"], "graphs", where).items()}
        fused = v.get("fused_steps", [])
        if not isinstance(fused, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in fused):
            raise _corrupt(where, f"'fused_steps' must be a list of integers, not {fused!r}")
        int8_section = _obj(v.get("int8") or {}, "int8", where)
        int8 = {str(g): Int8Variant.from_dict(str(g), q, where) for g, q in int8_section.items()}
        known = v.get("known_prompts")
        licenses = v.get("licenses", [])
        extra = v.get("extra_files", [])
        if not isinstance(licenses, list) or not isinstance(extra, list):
            raise _corrupt(where, "'licenses' and 'extra_files' must be lists")
        files = {
            _rel_path(rel, f"files.{rel}", where): FileEntry.from_dict(rel, e, where)
            for rel, e in _obj(v["files"], "files", where).items()
        }
        manifest = cls(
            schema_version=version,
            model_name=name if isinstance(name, str) else None,
            audio=AudioSpec.from_dict(v["audio"], where),
            latent=latent,
            edm=EdmSpec.from_dict(v["edm"], where),
            guidance=GuidanceSpec.from_dict(v["guidance"], where),
            text=TextSpec.from_dict(v["text"], where),
            graphs=graphs,
            fused_steps=tuple(fused),
            int8=int8,
            known_prompts=KnownPromptsSpec.from_dict(known, where) if known else None,
            licenses=tuple(LicenseSpec.from_dict(i, lic, where) for i, lic in enumerate(licenses)),
            extra_files=tuple(_rel_path(e, "extra_files[]", where) for e in extra),
            files=files,
        )
        manifest._check_references(where)
        return manifest

    def _check_references(self, where: str) -> None:
        """Every graph the runtime needs exists, and every file a section names is in the verified file table."""
        for name in REQUIRED_GRAPHS[self.latent.kind]:
            if name not in self.graphs:
                raise _corrupt(where, f"it has no graph '{name}', which a {self.latent.kind}-latent bundle needs")
        for steps in self.fused_steps:
            if f"fused_{steps}" not in self.graphs:
                raise _corrupt(where, f"'fused_steps' lists {steps} but there is no graph 'fused_{steps}'")
        for graph in self.int8:
            if graph not in self.graphs:
                raise _corrupt(where, f"'int8' has a variant of '{graph}', which is not one of its graphs")
        named = [(rel, f"graph '{g.name}'") for g in self.graphs.values() for rel in g.referenced_files()]
        named += [(self.text.tokenizer, "the text tokenizer")]
        named += [(rel, f"the INT8 variant of '{g}'") for g, q in self.int8.items() for rel in q.referenced_files()]
        if self.known_prompts is not None:
            kp = self.known_prompts
            named += [(kp.file, "the known prompts"), (kp.embeddings, "the known prompts' embeddings")]
        named += [(lic.file, f"the licence of {lic.component}") for lic in self.licenses if lic.file]
        named += [(rel, "'extra_files'") for rel in self.extra_files]
        for rel, owner in named:
            if rel not in self.files:
                raise _corrupt(
                    where, f"{owner} names {rel}, which its file table does not list (so it cannot be verified)"
                )
