"""Text conditioning shared by the stages, eval and control: encoded captions and the prompts of the samples.

The text encoder is frozen: a stage encodes every distinct caption of its dataset once (CaptionTable, "" is
row 0, the caption dropout of METHOD §3.1 picks it), and arbitrary prompts on demand (encode_prompts).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .models.denoiser import Conditioning
from .models.text import TextEncoder, load_tokenizer, tokenize

if TYPE_CHECKING:
    from .data import ClipDataset


class CaptionTable:
    """Every distinct caption encoded once: tokens [U, L, H], mask [U, L], pooled [U, H]; row 0 is ""."""

    def __init__(self, text: TextEncoder, captions: list[str], max_length: int, batch: int = 64) -> None:
        self.names = ["", *sorted(set(captions) - {""})]
        self.row = {c: i for i, c in enumerate(self.names)}
        tok = load_tokenizer(max_length)
        toks, masks, pooled = [], [], []
        with torch.no_grad():
            for i in range(0, len(self.names), batch):
                ids, mask = tokenize(tok, self.names[i : i + batch])
                t, p = text(ids, mask)
                toks.append(t)
                masks.append(mask)
                pooled.append(p)
        self.tokens, self.mask, self.pooled = torch.cat(toks), torch.cat(masks), torch.cat(pooled)

    def rows(self, captions: list[str]) -> torch.Tensor:
        """Row indices [B] (long) of captions that are in the table."""
        return torch.tensor([self.row[c] for c in captions], dtype=torch.long)

    def cond(self, rows: torch.Tensor) -> Conditioning:
        return Conditioning(self.tokens[rows], self.mask[rows], self.pooled[rows])


def encode_prompts(text: TextEncoder, prompts: list[str], max_length: int) -> Conditioning:
    """Conditioning of arbitrary prompts [P, ...] (the sampler's captions need not be in the table)."""
    ids, mask = tokenize(load_tokenizer(max_length), prompts)
    with torch.no_grad():
        tokens, pooled = text(ids, mask)
    return Conditioning(tokens, mask, pooled)


def sample_split(ds: ClipDataset) -> str:
    """The split whose captions and clips the samples take: test, or train when there are no test clips."""
    return "test" if len(ds.indices("test")) else "train"


def sample_prompts(ds: ClipDataset, configured: tuple[str, ...] | list[str], k: int = 8) -> list[str]:
    """The configured prompts, or k distinct captions of the sample split spread over its corpora."""
    if configured:
        return list(configured)
    from .report import pick_examples

    caps = [ds.captions[int(i)] for i in pick_examples(ds, ds.indices(sample_split(ds)), 4 * k)]
    return list(dict.fromkeys(caps))[:k]
