"""Normalisation statistics (z-score, as pi0) computed from episode data and stored as norm_stats.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from policy_runtime.artifacts import atomic_write_text
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
    def from_dict(cls, d: dict, where: str = "stats") -> Stats:
        """Stats from JSON: four equally long lists of finite numbers (std not negative), else a UserError."""
        if not isinstance(d, dict):
            raise UserError(f"{where} must be a mapping of mean, std, q01 and q99, got {type(d).__name__}")
        arrays = []
        for k in ("mean", "std", "q01", "q99"):
            if k not in d:
                raise UserError(f"{where} has no {k}")
            v = d[k]
            if not isinstance(v, list) or not all(type(x) in (int, float) for x in v):
                raise UserError(f"{where}.{k} must be a list of numbers, got {str(v)[:60]}")
            arr = np.asarray(v, np.float64)
            if not np.isfinite(arr).all():
                raise UserError(f"{where}.{k} holds NaN or Inf")
            arrays.append(arr)
        lengths = [len(a) for a in arrays]
        if len(set(lengths)) > 1:
            raise UserError(f"{where}: mean, std, q01 and q99 have different lengths {lengths}")
        if (arrays[1] < 0).any():
            raise UserError(f"{where}.std has negative values")
        return cls(*arrays)


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
    def from_dict(cls, d: dict, where: str = "norm stats") -> NormStats:
        if not isinstance(d, dict) or "state" not in d or "actions" not in d:
            raise UserError(f"{where} must be a mapping with state and actions statistics")
        return cls(Stats.from_dict(d["state"], f"{where}: state"), Stats.from_dict(d["actions"], f"{where}: actions"))

    def check_dims(self, state_dim: int, action_dim: int, where: str) -> None:
        """Refuse statistics of another state or action size than the model's (one line naming both)."""
        for name, stats, dim in (("state", self.state, state_dim), ("actions", self.actions, action_dim)):
            if len(stats.mean) != dim:
                raise UserError(f"{where}: {name} statistics have {len(stats.mean)} values but the model's "
                                f"{name} have {dim}")

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> NormStats:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read norm stats {path}: {e}") from None
        return cls.from_dict(data, f"norm stats {path}")


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
