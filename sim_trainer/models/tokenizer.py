"""The contract's byte-level instruction tokenizer (policy_runtime.contract), as torch tensors for the trainer."""

from __future__ import annotations

import torch

from policy_runtime.contract import BOS, PAD, VOCAB_SIZE
from policy_runtime.contract import tokenize as tokenize_np

__all__ = ["BOS", "PAD", "VOCAB_SIZE", "tokenize", "tokenize_batch"]


def tokenize(text: str, max_len: int) -> torch.Tensor:
    """[max_len] int64: BOS, the UTF-8 bytes (offset by 2), then PAD; too-long text is truncated."""
    return torch.from_numpy(tokenize_np(text, max_len))


def tokenize_batch(texts: list[str], max_len: int) -> torch.Tensor:
    return torch.stack([tokenize(t, max_len) for t in texts])
