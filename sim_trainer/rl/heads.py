"""Heads that RL adds to the flow VLA: an exploration-noise head and a value head (on actor features or on the
simulator's privileged state)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from sim_trainer.models.flow_vla import sinusoidal


def squash_std(g: torch.Tensor, std_min: float, std_max: float) -> torch.Tensor:
    """Map an unbounded output into [std_min, std_max] through a tanh on the log-variance (RLinf/ReinFlow band)."""
    lo, hi = 2 * math.log(std_min), 2 * math.log(std_max)
    log_var = lo + (hi - lo) * (torch.tanh(g) + 1) / 2
    return torch.exp(0.5 * log_var)


def annealed_std_max(std_min: float, std_max: float, progress: float, hold: float = 0.35) -> float:
    """The noise band's upper bound at `progress` (0..1) through training: held at std_max for the first `hold`
    of the run, then cosine-annealed to 0.3 * std_min + 0.7 * std_max at the end (ReinFlow's decay): late
    updates explore less around a policy that already works, which keeps a converged run from drifting."""
    end = 0.3 * std_min + 0.7 * std_max
    if progress <= hold:
        return std_max
    t = min(1.0, (progress - hold) / (1.0 - hold))
    return end + (std_max - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def _mlp(sizes: list[int], act: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


class TokenNoiseHead(nn.Module):
    """Flow-Noise: std per action token and dimension from the action expert's per-token features.

    The features depend on the observation (cross-attention to the prefix), on x_k and on tau_k.
    """

    def __init__(self, d_model: int, action_dim: int, std_min: float, std_max: float, hidden: int = 128):
        super().__init__()
        self.std_min, self.std_max = std_min, std_max
        self.net = _mlp([d_model, hidden, hidden // 2, action_dim], nn.Tanh)
        nn.init.zeros_(self.net[-1].weight)  # start in the middle of the band for every input
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return squash_std(self.net(feats), self.std_min, self.std_max)


class ObsTimeNoiseHead(nn.Module):
    """ReinFlow-style: std for the whole chunk from (pooled observation features, flow time), not from x_k."""

    def __init__(self, d_model: int, horizon: int, action_dim: int, std_min: float, std_max: float,
                 hidden: int = 128):
        super().__init__()
        self.std_min, self.std_max, self.d = std_min, std_max, d_model
        self.shape = (horizon, action_dim)
        self.net = _mlp([2 * d_model, hidden, hidden, horizon * action_dim], nn.Tanh)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, pooled: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        x = torch.cat([pooled, sinusoidal(tau, self.d)], -1)
        return squash_std(self.net(x), self.std_min, self.std_max).view(-1, *self.shape)


class ValueHead(nn.Module):
    """V(s) from detached observation features (pooled prefix, or the action expert's pooled tokens)."""

    def __init__(self, d_in: int, hidden: tuple[int, ...] = (256, 128)):
        super().__init__()
        self.net = _mlp([d_in, *hidden, 1], nn.ReLU)
        nn.init.normal_(self.net[-1].weight, std=0.02)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        # [B, 1] -> [B] as a new tensor, not a view: FSDP hooks the policy's outputs for backward, and warns on views
        return self.net(feats).sum(-1)


class RunningNorm(nn.Module):
    """Clipped z-score of a vector under its running mean and variance (float64 buffers: saved, resumed, and
    identical on every rank since each merge sums the batch over ranks). Identity until the first merge."""

    def __init__(self, dim: int, clip: float = 10.0):
        super().__init__()
        self.clip = clip
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("var", torch.ones(dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor, total: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> None:
        """Merge a batch x [M, D] into the moments (Chan et al.); `total` sums a tensor over data-parallel ranks."""
        x, d = x.double(), x.shape[-1]
        sums = total(torch.cat([x.new_tensor([x.shape[0]]), x.sum(0), x.pow(2).sum(0)]))
        n, mean = sums[0], sums[1:d + 1] / sums[0]
        var = (sums[d + 1:] / n - mean**2).clamp_min(0.0)
        tot = self.count + n
        delta = mean - self.mean
        self.var.copy_((self.var * self.count + var * n + delta**2 * self.count * n / tot) / tot)
        self.mean.add_(delta * n / tot)
        self.count.copy_(tot)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.mean.to(x.dtype)) / (self.var.to(x.dtype) + 1e-8).sqrt()
        return z.clamp(-self.clip, self.clip)


class PrivilegedValueHead(nn.Module):
    """V(s) from the simulator's true low-dimensional state (never from the actor): running normalisation, a small
    MLP encoder of its own, then the value MLP."""

    def __init__(self, dim: int, hidden: int = 256):
        super().__init__()
        self.norm = RunningNorm(dim)
        self.encoder = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.head = ValueHead(hidden)

    def forward(self, privileged: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.norm(privileged)))
