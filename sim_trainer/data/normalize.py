"""Normalisation statistics (z-score, as pi0) computed from episode data and stored as norm_stats.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sim_trainer.errors import UserError

STD_FLOOR = 1e-2  # constant dims (e.g. a task extra that never changes) must not blow up


@dataclass
class Stats:
    mean: np.ndarray
    std: np.ndarray
    q01: np.ndarray
    q99: np.ndarray

    @classmethod
    def of(cls, x: np.ndarray) -> Stats:
        x = np.asarray(x, np.float64)
        return cls(x.mean(0), x.std(0), np.quantile(x, 0.01, axis=0), np.quantile(x, 0.99, axis=0))

    def to_dict(self) -> dict:
        return {k: getattr(self, k).astype(float).tolist() for k in ("mean", "std", "q01", "q99")}

    @classmethod
    def from_dict(cls, d: dict) -> Stats:
        return cls(*(np.asarray(d[k], np.float64) for k in ("mean", "std", "q01", "q99")))


@dataclass
class NormStats:
    state: Stats
    actions: Stats

    @classmethod
    def from_episodes(cls, episodes) -> NormStats:
        return cls(
            Stats.of(np.concatenate([e.state for e in episodes])),
            Stats.of(np.concatenate([e.actions for e in episodes])),
        )

    def to_dict(self) -> dict:
        return {"version": 1, "kind": "zscore", "state": self.state.to_dict(), "actions": self.actions.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> NormStats:
        try:
            return cls(Stats.from_dict(d["state"]), Stats.from_dict(d["actions"]))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"malformed norm stats: {e!r}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> NormStats:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read norm stats {path}: {e}") from None


class Normalizer(torch.nn.Module):
    """z-score normalisation as buffers, so it moves with the model and is exported with it."""

    def __init__(self, stats: Stats):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(stats.mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(np.maximum(stats.std, STD_FLOOR), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean
