"""Executing action chunks at the robot's control rate, whatever the inference latency.

Time is counted in control steps. A chunk computed from the observation of step t0 holds the actions
meant for steps t0 .. t0 + H - 1. Executors decide when to ask for a new chunk and which action to send
at each step; `None` means "hold" (the caller keeps the arm where it is). They use numpy only, so the
same code runs in a ROS 2 timer and in a virtual-time simulator with injected latency.

- SyncExecutor: execute C actions, then ask and hold until the reply (what openpi's clients do).
- TemporalEnsembleExecutor: ask every `query_every` steps, average all predictions for the current step
  with weights exp(-m * i), oldest first (ACT).
- AsyncExecutor: ask for the next chunk while the current one runs (every `exec_steps` steps), switch to
  it when it arrives, skipping the steps that passed meanwhile. Merge modes: "switch" (hard switch),
  "crossfade" (linear blend from the old to the new chunk over `blend_steps`: the gradient-free option
  for the ONNX path), "rtc" (the request carries the leftover and the delay so the server can run
  guided real-time chunking; the switch is then hard because the prefix already agrees).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np


@dataclass
class ChunkRequest:
    """What an executor asks the inference side for, beyond the observation of `obs_step`."""

    obs_step: int
    leftover: np.ndarray | None = None  # [H, A] the previous chunk's actions for obs_step.., NaN-free, 0 padded
    delay_steps: int = 0  # steps expected to pass before the reply can be used


@dataclass
class _Chunk:
    start: int  # control step of chunk[0]
    actions: np.ndarray  # [H, A]

    def at(self, step: int) -> np.ndarray | None:
        i = step - self.start
        return self.actions[i] if 0 <= i < len(self.actions) else None


class DelayEstimator:
    """Delay in control steps from measured round trips: ceil(p95 of the last `window` latencies * rate)."""

    def __init__(self, control_hz: float, window: int = 50, initial_s: float = 0.0):
        self.hz = control_hz
        self.samples: deque[float] = deque(maxlen=window)
        self.initial_s = initial_s

    def add(self, latency_s: float) -> None:
        self.samples.append(latency_s)

    def steps(self) -> int:
        lat = float(np.percentile(self.samples, 95)) if self.samples else self.initial_s
        return int(math.ceil(lat * self.hz - 1e-9))


class SyncExecutor:
    def __init__(self, exec_steps: int):
        self.exec_steps = exec_steps
        self.reset()

    def reset(self) -> None:
        self.chunk: _Chunk | None = None
        self.pending = False
        self.executed = 0

    def request(self, step: int) -> ChunkRequest | None:
        if self.pending or (self.chunk is not None and self.executed < self.exec_steps):
            return None
        self.pending = True
        return ChunkRequest(step)

    def on_chunk(self, actions: np.ndarray, req: ChunkRequest, step: int) -> None:
        # The arm held while waiting, so the chunk starts now, not at the observation's step.
        self.chunk, self.pending, self.executed = _Chunk(step, np.asarray(actions)), False, 0

    def action(self, step: int) -> np.ndarray | None:
        if self.pending or self.chunk is None or self.executed >= self.exec_steps:
            return None
        a = self.chunk.at(step)
        self.executed += 1
        return a


class TemporalEnsembleExecutor:
    def __init__(self, horizon: int, query_every: int = 1, m: float = 0.1):
        self.horizon, self.query_every, self.m = horizon, query_every, m
        self.reset()

    def reset(self) -> None:
        self.chunks: list[_Chunk] = []
        self.last_request = -(10**9)

    def request(self, step: int) -> ChunkRequest | None:
        if step - self.last_request < self.query_every:
            return None
        self.last_request = step
        return ChunkRequest(step)

    def on_chunk(self, actions: np.ndarray, req: ChunkRequest, step: int) -> None:
        self.chunks.append(_Chunk(req.obs_step, np.asarray(actions)))

    def action(self, step: int) -> np.ndarray | None:
        self.chunks = [c for c in self.chunks if c.start + self.horizon > step]
        preds = [a for c in sorted(self.chunks, key=lambda c: c.start) if (a := c.at(step)) is not None]
        if not preds:
            return None
        w = np.exp(-self.m * np.arange(len(preds)))
        return (w[:, None] * np.stack(preds)).sum(0) / w.sum()


@dataclass
class AsyncExecutor:
    horizon: int
    exec_steps: int
    merge: str = "crossfade"  # "switch" | "crossfade" | "rtc"
    blend_steps: int = 4
    delay: DelayEstimator | None = None
    chunk: _Chunk | None = field(default=None, init=False)
    previous: _Chunk | None = field(default=None, init=False)
    switched_at: int = field(default=0, init=False)
    pending: bool = field(default=False, init=False)
    last_request: int = field(default=-(10**9), init=False)

    def __post_init__(self) -> None:
        if self.merge not in ("switch", "crossfade", "rtc"):
            raise ValueError(f"unknown merge mode {self.merge!r}")

    def reset(self) -> None:
        self.chunk = self.previous = None
        self.pending, self.last_request, self.switched_at = False, -(10**9), 0

    def request(self, step: int) -> ChunkRequest | None:
        if self.pending:
            return None
        if self.chunk is not None and step - self.last_request < self.exec_steps:
            return None
        self.pending, self.last_request = True, step
        d = self.delay.steps() if self.delay else 0
        leftover = None
        if self.merge == "rtc" and self.chunk is not None:
            leftover = np.zeros_like(self.chunk.actions)
            for i in range(self.horizon):
                a = self.chunk.at(step + i)
                if a is None:
                    break
                leftover[i] = a
        return ChunkRequest(step, leftover, d)

    def on_chunk(self, actions: np.ndarray, req: ChunkRequest, step: int) -> None:
        self.previous, self.chunk = self.chunk, _Chunk(req.obs_step, np.asarray(actions))
        self.pending, self.switched_at = False, step

    def action(self, step: int) -> np.ndarray | None:
        if self.chunk is None:
            return None
        new = self.chunk.at(step)
        old = self.previous.at(step) if self.previous is not None else None
        if new is None:
            return old  # the new chunk ran out (latency above H): hold if the old one did too
        if self.merge != "crossfade" or old is None:
            return new
        alpha = min(1.0, (step - self.switched_at + 1) / (self.blend_steps + 1))
        return (1 - alpha) * old + alpha * new


def make_executor(name: str, horizon: int, exec_steps: int, control_hz: float, expected_latency_s: float = 0.0):
    """Executors by name: sync, ensemble, async-switch, async-crossfade, async-rtc."""
    if name == "sync":
        return SyncExecutor(exec_steps)
    if name == "ensemble":
        return TemporalEnsembleExecutor(horizon, query_every=max(1, exec_steps // 2))
    if name.startswith("async-"):
        return AsyncExecutor(horizon, exec_steps, merge=name.split("-", 1)[1],
                             delay=DelayEstimator(control_hz, initial_s=expected_latency_s))
    raise ValueError(f"unknown chunk execution strategy {name!r}")


STRATEGIES = ("sync", "ensemble", "async-switch", "async-crossfade", "async-rtc")
