"""Byte-level instruction tokenizer: no vocabulary file to ship, any UTF-8 text is representable."""

from __future__ import annotations

import torch

PAD, BOS = 0, 1
VOCAB_SIZE = 256 + 2


def tokenize(text: str, max_len: int) -> torch.Tensor:
    """[max_len] int64: BOS, the UTF-8 bytes (offset by 2), then PAD; too-long text is truncated."""
    ids = [BOS] + [b + 2 for b in text.encode("utf-8")][: max_len - 1]
    return torch.tensor(ids + [PAD] * (max_len - len(ids)), dtype=torch.long)


def tokenize_batch(texts: list[str], max_len: int) -> torch.Tensor:
    return torch.stack([tokenize(t, max_len) for t in texts])
