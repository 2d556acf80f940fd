"""Prompt tokenisation with the `tokenizers` library from the bundled tokenizer file (fixed-length padding)."""

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
