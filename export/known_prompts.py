"""Known prompts: the pooled text embeddings of the captions a bundle's model was trained on, and the cosine
threshold below which the runtime (soundctm_rt/known_prompts.py) calls a prompt far from all of them.

The embeddings come from the exported text encoder graph (onnxruntime) and the bundle's tokenizer, L2-normalised
and rounded to float16 as stored, so every score here is the one the runtime computes.

Threshold calibration, recorded in known_prompts.json:
- held-out: a deterministic 20 % of the distinct captions (a permutation of the sorted list, seed 0); each one's
  highest cosine to the other 80 % stands for a new prompt phrased like the training captions;
- unrelated: UNRELATED_TEXTS (no sound in them, nothing a sound dataset describes); each one's highest cosine to
  all known captions stands for a prompt the model was not trained on;
- threshold = (p5(held-out) + p95(unrelated)) / 2 when p5(held-out) > p95(unrelated), else p5(held-out);
  false_warning_rate = the share of held-out scores below it, miss_rate = the share of unrelated scores at or
  above it.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ..backends import BackendOptions, open_file_session
from ..text import PromptTokenizer

log = logging.getLogger(__name__)

JSON_FILE = "known_prompts.json"
EMBEDDINGS_FILE = "known_prompts.npy"
HELD_OUT_FRACTION = 0.2
HELD_OUT_SEED = 0
PERCENTILES = (5, 25, 50, 75, 95)

# Texts no sound dataset captions: what a far prompt looks like. Varied in length, register and topic.
UNRELATED_TEXTS = (
    "the stock market fell today",
    "please reply to my email by Friday",
    "a recipe for lemon cake",
    "quantum chromodynamics lecture notes",
    "how to file a tax return",
    "the capital of Australia is Canberra",
    "my password expired again",
    "a spreadsheet of quarterly revenue",
    "the history of the Byzantine empire",
    "install the printer driver",
    "what is the derivative of x squared",
    "a poem about longing and regret",
    "terms and conditions apply",
    "the meeting is moved to Tuesday",
    "a list of prime numbers",
    "vegan lasagna with spinach",
    "the mitochondria is the powerhouse of the cell",
    "shipping address and billing details",
    "a photograph of a red bicycle",
    "the committee approved the budget",
    "learn French in thirty days",
    "an essay on Kant's moral philosophy",
    "the football transfer window closes",
    "compile the kernel with debug symbols",
    "a blue watercolour painting of mountains",
    "interest rates and inflation forecast",
    "knitting pattern for a wool scarf",
    "the treaty was signed in 1648",
    "symptoms of vitamin D deficiency",
    "a cheap flight to Lisbon",
    "the novel's protagonist is an orphan",
    "hexadecimal colour code for teal",
    "annual general meeting minutes",
    "a mortgage calculator",
    "the grammar of Latin verbs",
    "garden soil pH and fertiliser",
    "a birthday card for grandma",
    "the speed of light in a vacuum",
    "SQL join on two tables",
    "a museum ticket for two adults",
)


def read_corpora(path: Path, captions: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The corpus of each caption (names joined by '+' where a caption occurs in several), from a CSV with
    `caption` and `corpus` columns (a prepared dataset's clips.csv); () when the CSV has no `corpus` column."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "corpus" not in rows[0]:
        return ()
    seen: dict[str, set[str]] = {}
    for r in rows:
        if r.get("caption") and r.get("corpus"):
            seen.setdefault(r["caption"], set()).add(r["corpus"])
    return tuple("+".join(sorted(seen.get(c, ()))) for c in captions)


def pooled_embeddings(bundle_dir: Path, texts: list[str], max_length: int, batch: int = 64) -> np.ndarray:
    """L2-normalised pooled embeddings [N, H] float32 from the bundle's exported text encoder and tokenizer."""
    sess = open_file_session(bundle_dir / "onnx" / "text_encoder.onnx", BackendOptions(backend="onnxruntime"))
    tok = PromptTokenizer(bundle_dir / "tokenizer.json", max_length)
    out = []
    for i in range(0, len(texts), batch):
        ids, mask = tok(texts[i : i + batch])
        _tokens, pooled = sess.run({"input_ids": ids, "attention_mask": mask})
        out.append(np.asarray(pooled, np.float32))
    return normalise(np.concatenate(out))


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows of x [N, H] scaled to unit L2 norm (a zero row stays zero)."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def max_cosine(queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Each unit-norm query's highest cosine [N] to the unit-norm keys [M, H]."""
    return (queries @ keys.T).max(axis=1)


def held_out_split(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(held-out, kept) indices of n sorted captions: a seeded 20 % (at least one) held out, when n >= 2."""
    if n < 2:
        return np.zeros(0, np.int64), np.arange(n)
    perm = np.random.default_rng(HELD_OUT_SEED).permutation(n)
    k = min(n - 1, max(1, round(HELD_OUT_FRACTION * n)))
    return np.sort(perm[:k]), np.sort(perm[k:])


def calibrate(held: np.ndarray, unrelated: np.ndarray) -> tuple[float, dict[str, Any]]:
    """The threshold from held-out [N] and unrelated [M] max-cosine scores, and the record of how (module doc)."""
    u95 = float(np.percentile(unrelated, 95))
    if held.size:
        h5 = float(np.percentile(held, 5))
        threshold = (h5 + u95) / 2 if h5 > u95 else h5
        rule = "midpoint of held-out p5 and unrelated p95" if h5 > u95 else "held-out p5 (the distributions overlap)"
    else:  # one caption: nothing to hold out, only the unrelated side is known
        threshold, rule = u95, "unrelated p95 (too few captions to hold any out)"
    record = {
        "rule": rule,
        "held_out": _summary(held, "highest cosine of each held-out caption to the other captions")
        | {"fraction": HELD_OUT_FRACTION, "seed": HELD_OUT_SEED},
        "unrelated": _summary(unrelated, "highest cosine of each built-in unrelated text to all known captions"),
        "false_warning_rate": round(float(np.mean(held < threshold)), 4) if held.size else None,
        "miss_rate": round(float(np.mean(unrelated >= threshold)), 4),
    }
    return round(threshold, 5), record


def _summary(scores: np.ndarray, what: str) -> dict[str, Any]:
    pct = {f"p{q}": round(float(np.percentile(scores, q)), 5) for q in PERCENTILES} if scores.size else {}
    return {"what": what, "count": int(scores.size), "percentiles": pct}


def write_known_prompts(
    bundle_dir: Path, captions: tuple[str, ...] | list[str], corpora: tuple[str, ...], max_length: int
) -> dict[str, Any]:
    """Write known_prompts.json and known_prompts.npy (float16 [U, H]) into an exported bundle.

    Args:
        bundle_dir: the bundle being exported (its onnx/text_encoder.onnx and tokenizer.json are written).
        captions: the training captions (duplicates are dropped).
        corpora: the corpus of each caption, parallel to `captions`, or ().
        max_length: the text encoder's token length.

    Returns:
        The manifest's `known_prompts` section: {"file", "embeddings", "threshold", "count"}.
    """
    corpus_of = dict(zip(captions, corpora, strict=True)) if corpora else {}
    known = sorted(set(captions))
    if not known:
        raise ValueError("known prompts need at least one caption")
    emb = normalise(pooled_embeddings(bundle_dir, known, max_length).astype(np.float16))  # as the runtime reads it
    held_idx, kept_idx = held_out_split(len(known))
    held = max_cosine(emb[held_idx], emb[kept_idx]) if held_idx.size else np.zeros(0, np.float32)
    known_set = set(known)
    texts = [t for t in UNRELATED_TEXTS if t not in known_set]
    unrelated = max_cosine(pooled_embeddings(bundle_dir, texts, max_length), emb)  # a prompt: float32, as at runtime
    threshold, record = calibrate(held, unrelated)
    np.save(bundle_dir / EMBEDDINGS_FILE, emb.astype(np.float16), allow_pickle=False)
    doc: dict[str, Any] = {"captions": known}
    if corpus_of:
        doc["corpus"] = [corpus_of[c] for c in known]
        doc["corpora"] = dict(sorted(Counter(doc["corpus"]).items()))
    doc |= {
        "embeddings": EMBEDDINGS_FILE,
        "shape": list(emb.shape),
        "encoder": "onnx/text_encoder.onnx (pooled output, L2-normalised, float16)",
        "threshold": threshold,
        "calibration": record,
    }
    (bundle_dir / JSON_FILE).write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    log.info("known prompts: %d captions, threshold %.4f (%s)", len(known), threshold, record["rule"])
    return {"file": JSON_FILE, "embeddings": EMBEDDINGS_FILE, "threshold": threshold, "count": len(known)}
