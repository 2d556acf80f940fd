"""The compact bundle: float16 weight storage and an INT8 word-embedding table, to ship inside a wheel.

Both reductions are applied to the torch model before export, so the exported graphs compute exactly what the
rounded torch model computes and the parity gate keeps its meaning (torch vs backend, same weights):
- every weight is rounded to float16 (`round_to_fp16`); the ONNX files then store them as float16 behind a Cast
  to float32 (onnx_io.SharedWeights.externalize), which both runtimes fold at load time: float32 compute,
  half the bytes;
- the text encoder's word-embedding table (half of all-MiniLM-L6-v2's parameters) is rounded to a symmetric
  per-tensor INT8 grid (`quantise_word_embeddings`), and the ONNX graph stores that Gather's table as int8
  followed by a DequantizeLinear (`int8_word_embedding_gather`; only the gathered rows are dequantised) —
  lossless, because the values already lie on the grid.
What the rounding costs against the original float32 text encoder is measured on captions
(`text_encoder_quality`) and gated: the pooled cosine similarity must stay >= 0.99 (Training I, item 2).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

log = logging.getLogger(__name__)

MIN_POOLED_COSINE = 0.99
INT8_QMAX = 127  # onnxruntime's symmetric QInt8 range is [-127, 127]


def round_to_fp16(*modules: torch.nn.Module) -> int:
    """Round every floating parameter and buffer to the nearest float16 value (kept as float32); returns count."""
    n = 0
    with torch.no_grad():
        for m in modules:
            for t in [*m.parameters(), *m.buffers()]:
                if t.dtype == torch.float32:
                    t.copy_(t.half().float())
                    n += t.numel()
    return n


def word_embedding(text: torch.nn.Module) -> torch.nn.Embedding:
    """The token-embedding table of the (Hugging Face BERT) text encoder."""
    emb = text.bert.embeddings.word_embeddings  # type: ignore[union-attr]
    if not isinstance(emb, torch.nn.Embedding):
        raise TypeError("the text encoder has no word-embedding table to quantise")
    return emb


def quantise_word_embeddings(text: torch.nn.Module) -> float:
    """Round the word-embedding table onto the symmetric INT8 grid onnxruntime will use; returns the scale."""
    w = word_embedding(text).weight
    with torch.no_grad():
        # float32 throughout, as DequantizeLinear computes q * scale
        scale = torch.tensor(np.float32(w.abs().max().item()) / np.float32(INT8_QMAX), dtype=torch.float32)
        w.copy_(torch.clamp(torch.round(w / scale), -INT8_QMAX, INT8_QMAX) * scale)
    return float(scale)


def int8_word_embedding_gather(model_path: Path, table: np.ndarray, scale: float) -> str:
    """Store the Gather on the word-embedding table as int8 + DequantizeLinear, in place; returns the node name.

    `table` and `scale` are the torch encoder's rounded table and its grid step (quantise_word_embeddings): the
    initializer is found by content, and the rewrite is checked to be lossless.
    """
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    inits = {i.name: i for i in model.graph.initializer}
    found = [
        (k, n)
        for k, n in enumerate(model.graph.node)
        if n.op_type == "Gather"
        and n.input[0] in inits
        and tuple(inits[n.input[0]].dims) == table.shape
        and np.array_equal(numpy_helper.to_array(inits[n.input[0]]), table)
    ]
    if len(found) != 1:
        raise ValueError(f"expected one Gather on the word-embedding table in {model_path.name}, found {len(found)}")
    k, gather = found[0]
    s32 = np.float32(scale)
    q = np.round(table / s32)
    if np.abs(q).max() > INT8_QMAX or not np.array_equal(q.astype(np.float32) * s32, table):
        raise ValueError("the word-embedding table is not on its INT8 grid; run quantise_word_embeddings first")
    name = gather.input[0]
    init = inits[name]
    init.CopyFrom(numpy_helper.from_array(q.astype(np.int8), name))
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(s32), f"{name}_scale"),
            numpy_helper.from_array(np.array(0, dtype=np.int8), f"{name}_zero"),
        ]
    )
    out = gather.output[0]
    gather.output[0] = f"{out}_int8"
    dq = onnx.helper.make_node(
        "DequantizeLinear", [f"{out}_int8", f"{name}_scale", f"{name}_zero"], [out], name=f"{gather.name}_dequantize"
    )
    model.graph.node.insert(k + 1, dq)
    onnx.save_model(model, str(model_path))
    return gather.name


def text_encoder_quality(
    reference: torch.nn.Module, session: Any, captions: list[str], max_length: int
) -> dict[str, Any]:
    """Cosine similarity of the shipped text encoder (a backend session) to the float32 original, on captions."""
    from ..train.models.text import load_tokenizer, tokenize

    tok = load_tokenizer(max_length)
    pooled_cos, token_cos = [], []
    for i in range(0, len(captions), 64):
        ids, mask = tokenize(tok, captions[i : i + 64])
        with torch.no_grad():
            ref_tokens, ref_pooled = (t.numpy() for t in reference(ids, mask))
        tokens, pooled = session.run({"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        pooled_cos.append(_cosine(ref_pooled, pooled))
        valid = mask.numpy() > 0
        token_cos.append(_cosine(ref_tokens, tokens)[valid])
    pc, tc = np.concatenate(pooled_cos), np.concatenate(token_cos)
    return {
        "captions": len(captions),
        "pooled_cosine_min": round(float(pc.min()), 5),
        "pooled_cosine_mean": round(float(pc.mean()), 5),
        "token_cosine_min": round(float(tc.min()), 5),
        "token_cosine_mean": round(float(tc.mean()), 5),
        "gate": f"pooled_cosine_min >= {MIN_POOLED_COSINE}",
    }


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)


def read_captions(path: Path) -> list[str]:
    """Unique captions of a prepared dataset (clips.csv) or any CSV with a `caption` column. With a `split`
    column only the training rows count: they are what the model knows (held-out machines and folds are not)."""
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "caption" not in rows[0]:
        raise ValueError(f"{path} has no 'caption' column")
    if "split" in rows[0]:
        rows = [r for r in rows if r["split"] == "train"]
    return sorted({r["caption"] for r in rows if r["caption"]})
