"""Prompt tokenisation with the `tokenizers` library from the bundled tokenizer file (fixed-length padding), and
the token lengths a text encoder with a dynamic length runs at."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class PromptTokenizer:
    """Prompts -> (input_ids, attention_mask) int64 [B, L], padded/truncated to the bundle's max_length."""

    def __init__(self, path: Path, max_length: int) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(path))
        self.tok.enable_truncation(max_length)
        self.tok.enable_padding(length=max_length, pad_id=0, pad_token="[PAD]")
        self.max_length = max_length

    def __call__(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        enc = self.tok.encode_batch(list(prompts))
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        return ids, mask


def length_buckets(max_length: int) -> list[int]:
    """Token lengths a length-dynamic text encoder is run at: 8, 16, ... below max_length, then max_length.

    The encoder's cost is nearly linear in its length (all-MiniLM-L6-v2, 6 layers of 384 wide), and most prompts
    are short ("a dog barking" is 5 tokens with [CLS] and [SEP], "Roland TR-808 snare drum" 10), so a prompt runs
    at the smallest bucket that holds it instead of at max_length. Few fixed lengths, not the exact one: one
    dynamic-length session serves them all, and the backends keep per-shape work (OpenVINO compiles per input
    shape), so fewer distinct shapes mean fewer first-time costs.
    """
    out, n = [], 8
    while n < max_length:
        out.append(n)
        n *= 2
    return [*out, max_length]


def bucket_for(n_tokens: int, buckets: list[int]) -> int:
    """The smallest bucket holding n_tokens (the largest if none does: the tokenizer has cut the prompt)."""
    return next((b for b in buckets if n_tokens <= b), buckets[-1])
