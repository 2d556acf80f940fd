"""What the model knows: a bundle's training captions as pooled text embeddings, and the check that warns when a
prompt is far from all of them (its highest cosine below the bundle's calibrated threshold).

A far prompt still generates; the model has simply seen nothing like it, so the sound is a guess. The
embeddings and the threshold are written at export (export/known_prompts.py documents the calibration); a bundle
without them (exported before, or without `--captions`) has no check.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from .bundle import Bundle, BundleError

log = logging.getLogger(__name__)

NEAREST = 3  # known prompts named in a warning


@dataclass(frozen=True)
class PromptWarning:
    """A prompt far from every known caption: its highest cosine, the threshold, and the nearest captions."""

    cosine: float
    threshold: float
    nearest: list[tuple[str, float]]  # (caption, cosine), best first
    prompt: str | None = None

    @property
    def message(self) -> str:
        """One line for a terminal or an OSC reply."""
        who = f"prompt {self.prompt!r}" if self.prompt is not None else "the prompt"
        near = ", ".join(f"{c!r} ({s:.2f})" for c, s in self.nearest)
        return (
            f"{who} is far from what the model was trained on (cosine {self.cosine:.2f} < {self.threshold:.2f}); "
            f"nearest known prompts: {near}"
        )

    def __str__(self) -> str:
        return self.message


class KnownPrompts:
    """The known captions and their unit-norm pooled embeddings.

    Args:
        captions: U distinct captions.
        embeddings: [U, H] pooled text embeddings, one row per caption (normalised here).
        threshold: a prompt whose highest cosine to the captions is below this is far.
        corpus: the corpus of each caption, or None.
    """

    def __init__(
        self, captions: list[str], embeddings: np.ndarray, threshold: float, corpus: list[str] | None = None
    ) -> None:
        e = np.asarray(embeddings, np.float32)
        if e.ndim != 2 or e.shape[0] != len(captions):
            raise ValueError(f"embeddings {e.shape} do not match {len(captions)} captions")
        if corpus is not None and len(corpus) != len(captions):
            raise ValueError(f"{len(corpus)} corpus names for {len(captions)} captions")
        self.captions = list(captions)
        self.embeddings = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        self.threshold = float(threshold)
        self.corpus = corpus
        self.calibration: dict[str, Any] = {}

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> KnownPrompts | None:
        """The bundle's known prompts; None when it has none. The threshold is the manifest's."""
        section = bundle.manifest.get("known_prompts")
        if not section:
            return None
        try:
            doc = json.loads(bundle.path(section["file"]).read_text())
            emb = np.load(bundle.path(section["embeddings"]), allow_pickle=False)
            known = cls(doc["captions"], emb, float(section["threshold"]), doc.get("corpus"))
        except (OSError, KeyError, TypeError, ValueError) as e:
            raise BundleError(
                f"bundle {bundle.root}: its known prompts cannot be read ({e}); re-export the bundle"
            ) from e
        known.calibration = doc.get("calibration", {})
        return known

    def __len__(self) -> int:
        return len(self.captions)

    def cosines(self, pooled: np.ndarray) -> np.ndarray:
        """Cosine [U] of one pooled prompt embedding [H] to every known caption."""
        q = np.asarray(pooled, np.float32).reshape(-1)
        if q.shape[0] != self.embeddings.shape[1]:
            raise ValueError(f"pooled embedding has {q.shape[0]} values, the known prompts {self.embeddings.shape[1]}")
        return self.embeddings @ (q / max(float(np.linalg.norm(q)), 1e-12))

    def nearest(self, pooled: np.ndarray, k: int = NEAREST) -> list[tuple[str, float]]:
        """The k known captions nearest to a pooled embedding [H]: (caption, cosine), best first."""
        c = self.cosines(pooled)
        k = min(k, len(c))
        top = np.argpartition(-c, k - 1)[:k]
        top = top[np.argsort(-c[top], kind="stable")]
        return [(self.captions[i], float(c[i])) for i in top]

    def check(self, pooled: np.ndarray, prompt: str | None = None) -> PromptWarning | None:
        """A PromptWarning when the pooled embedding [H] is far from every known caption, else None."""
        near = self.nearest(pooled)
        best = near[0][1] if near else -1.0
        if best >= self.threshold:
            return None
        return PromptWarning(best, self.threshold, near, prompt)

    def examples(self, n: int = 12) -> list[str]:
        """Up to n captions spread evenly over the (sorted) list, for `soundctm-rt info`."""
        if len(self.captions) <= n:
            return list(self.captions)
        idx = np.linspace(0, len(self.captions) - 1, n).round().astype(int)
        return [self.captions[i] for i in idx]

    def corpora(self) -> dict[str, int]:
        """How many captions each corpus has ({} when the bundle does not say)."""
        out: dict[str, int] = {}
        for c in self.corpus or []:
            out[c] = out.get(c, 0) + 1
        return dict(sorted(out.items()))
