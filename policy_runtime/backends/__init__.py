"""Inference backends: one interface so the server does not care whether ONNX Runtime or torch runs the model.

Import the concrete backends from their modules (`backends.onnx_backend`, `backends.torch_backend`); this
package itself imports neither onnxruntime nor torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from policy_runtime.protocol import Contract, InferRequest


@dataclass
class ChunkResult:
    """One request's outcome: a clipped [H, A] float32 chunk, or an (error code, message) for that row only."""

    actions: np.ndarray | None
    clipped_values: int = 0
    error: tuple[str, str] | None = None
    rtc_applied: bool = False  # the chunk was guided toward the request's prev_chunk (real-time chunking)


class Backend(Protocol):
    """What the server needs from a model: its contract and a batched, validated inference call."""

    name: str

    def contract(self) -> Contract:
        """The contract clients see in the hello reply (server-side fields such as max_batch are filled later)."""
        ...

    def infer_batch(self, requests: Sequence[InferRequest]) -> list[ChunkResult]:
        """One chunk per request, in order; requests were validated against contract() already."""
        ...

    def close(self) -> None:
        ...
