"""Chunk samples from episodes, and mixing several datasets with given ratios (RL-Co Stage I needs it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from policy_runtime.episodes import Episode


@dataclass
class Batch:
    images: dict[str, torch.Tensor]  # uint8 [B, H, W, 3]
    state: torch.Tensor  # [B, S]
    actions: torch.Tensor  # [B, H, A] raw
    valid: torch.Tensor  # [B, H] False where the chunk runs past the episode's end
    text: torch.Tensor  # [B, L] instruction tokens of each sample's own episode
    source: torch.Tensor  # [B] index of the dataset each sample came from

    def to(self, device: torch.device) -> Batch:
        return Batch({k: v.to(device) for k, v in self.images.items()}, self.state.to(device),
                     self.actions.to(device), self.valid.to(device), self.text.to(device), self.source.to(device))


class ChunkSource:
    """All (episode, t) samples of one dataset held in memory as flat arrays; `tokenize` is the model's own
    (FlowPolicy.tokenize), applied once per distinct instruction."""

    def __init__(self, episodes: list[Episode], horizon: int, tokenize: Callable[[list[str]], torch.Tensor]):
        self.horizon = horizon
        texts = sorted({e.instruction for e in episodes})
        self.text_tokens = tokenize(texts)
        self.text_index = np.concatenate(
            [np.full(len(e), texts.index(e.instruction)) for e in episodes])
        self.state = np.concatenate([e.state for e in episodes]).astype(np.float32)
        self.actions = np.concatenate([e.actions for e in episodes]).astype(np.float32)
        self.cameras = list(episodes[0].images)
        self.images = {c: np.concatenate([e.images[c] for e in episodes]) for c in self.cameras}
        starts = np.cumsum([0] + [len(e) for e in episodes])
        self.episode_end = np.concatenate([np.full(len(e), starts[i + 1]) for i, e in enumerate(episodes)])

    def __len__(self) -> int:
        return len(self.state)

    def gather(self, idx: np.ndarray) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray, torch.Tensor]:
        offs = idx[:, None] + np.arange(self.horizon)[None, :]
        end = self.episode_end[idx][:, None]
        valid = offs < end
        offs = np.minimum(offs, end - 1)  # pad with the episode's last action; padded steps carry no loss
        images = {c: self.images[c][idx] for c in self.cameras}
        return images, self.state[idx], self.actions[offs], valid, self.text_tokens[self.text_index[idx]]


class MixedSampler:
    """Each sample's dataset is drawn with the given probabilities, then a uniform sample within it."""

    def __init__(self, sources: list[ChunkSource], ratios: list[float], seed: int = 0):
        if len(sources) != len(ratios) or any(r < 0 for r in ratios) or sum(ratios) <= 0:
            raise ValueError("need one non-negative ratio per dataset, not all zero")
        self.sources = sources
        self.p = np.asarray(ratios, np.float64) / sum(ratios)
        self.rng = np.random.default_rng(seed)

    def sample(self, batch_size: int) -> Batch:
        which = self.rng.choice(len(self.sources), size=batch_size, p=self.p)
        parts = []
        for s, src in enumerate(self.sources):
            n = int((which == s).sum())
            if n:
                parts.append((s, src.gather(self.rng.integers(0, len(src), size=n))))
        images = {c: torch.from_numpy(np.concatenate([p[1][0][c] for p in parts])) for c in self.sources[0].cameras}
        return Batch(
            images=images,
            state=torch.from_numpy(np.concatenate([p[1][1] for p in parts])),
            actions=torch.from_numpy(np.concatenate([p[1][2] for p in parts])),
            valid=torch.from_numpy(np.concatenate([p[1][3] for p in parts])),
            text=torch.cat([p[1][4] for p in parts]),
            source=torch.from_numpy(np.concatenate([np.full(len(p[1][1]), p[0]) for p in parts])),
        )


def random_shift(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """DrQ-style augmentation: replicate-pad by `pad` pixels and crop back at a random offset per image."""
    if pad <= 0:
        return images
    b, h, w, _ = images.shape
    x = torch.nn.functional.pad(images.permute(0, 3, 1, 2).float(), (pad,) * 4, mode="replicate")
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    out = torch.stack([x[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
    return out.to(torch.uint8).permute(0, 2, 3, 1)
