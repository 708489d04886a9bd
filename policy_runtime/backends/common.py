"""Input assembly and output post-processing shared by every backend, so ONNX and torch see identical inputs.

Numpy only: the tokenizer is the contract's (policy_runtime.contract) and the noise comes from
numpy Generators, so a request with a given noise_seed gets the same chunk from either backend.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from policy_runtime.backends import ChunkResult
from policy_runtime.contract import graph_feeds, instruction_tokens
from policy_runtime.protocol import NON_FINITE_OUTPUT, Contract, InferRequest


def normalisation_sha256(norm_stats_file: Path) -> str:
    """sha256 of the norm_stats.json bytes: the exporter copies that file byte for byte, so any language can
    recompute the manifest's `normalisation.sha256` from the file next to the model."""
    return hashlib.sha256(Path(norm_stats_file).read_bytes()).hexdigest()


class NoiseSource:
    """Initial flow noise: per-request seeded when the client asks, else from the server's seeded stream."""

    def __init__(self, seed: int, shape: tuple[int, int]):
        self.rng, self.shape = np.random.default_rng(seed), shape

    def draw(self, seed: int | None) -> np.ndarray:
        rng = self.rng if seed is None else np.random.default_rng(seed)
        return rng.standard_normal(self.shape, dtype=np.float32)


def batch_inputs(requests: Sequence[InferRequest], contract: Contract, noise: NoiseSource) -> dict[str, np.ndarray]:
    """Graph inputs keyed by their ONNX names (image.<camera>, state, text, noise), batch on axis 0."""
    default = instruction_tokens(contract, contract.default_instruction)
    return graph_feeds({c.name: np.stack([r.images[c.name] for r in requests]) for c in contract.cameras},
                       np.stack([r.state for r in requests]).astype(np.float32, copy=False),
                       np.stack([default if r.instruction is None else instruction_tokens(contract, r.instruction)
                                 for r in requests]),
                       np.stack([noise.draw(r.noise_seed) for r in requests]))


def finish(raw: np.ndarray, contract: Contract) -> list[ChunkResult]:
    """Split a [B, H, A] raw output into per-request chunks, refusing NaN/Inf and clipping to the action bounds."""
    low = np.asarray(contract.action_low, np.float32)
    high = np.asarray(contract.action_high, np.float32)
    out = []
    for row in np.asarray(raw, np.float32):
        if not np.isfinite(row).all():
            out.append(ChunkResult(None, 0, (NON_FINITE_OUTPUT, "the model produced NaN/Inf actions")))
            continue
        if contract.clip_actions:
            clipped = np.clip(row, low, high)
            out.append(ChunkResult(clipped, int(np.count_nonzero(clipped != row))))
        else:
            out.append(ChunkResult(row.copy(), 0))
    return out
