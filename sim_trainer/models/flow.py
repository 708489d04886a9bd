"""Flow-matching conventions, in one place (openpi's: tau = 1 is noise, tau = 0 is data).

Training:  x_tau = tau * eps + (1 - tau) * A,  target velocity u = eps - A.
Sampling:  tau_k = 1 - k / K for k = 0..K-1, x_{k+1} = x_k - (1/K) * v(x_k, tau_k).
Sampling, RL log-prob recomputation and export all take the grid from `time_grid`, so they cannot
drift apart (a public implementation fed different grids to sampling and log-probs).
"""

from __future__ import annotations

import torch


def time_grid(num_steps: int) -> torch.Tensor:
    """tau_0..tau_{K-1}, decreasing from 1 (noise) in steps of 1/K; the final tau_K = 0 is implicit."""
    if num_steps < 1:
        raise ValueError(f"number of denoising steps must be >= 1, got {num_steps}")
    return 1.0 - torch.arange(num_steps, dtype=torch.float32) / num_steps


def sample_tau(batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training times, skewed towards noise as in pi0: tau = 0.001 + 0.999 * Beta(1.5, 1)."""
    u = torch.rand(batch, generator=generator)
    beta_1p5_1 = u ** (1.0 / 1.5)  # inverse CDF of Beta(1.5, 1): F(x) = x^1.5
    return 0.001 + 0.999 * beta_1p5_1


def interpolate(actions: torch.Tensor, noise: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy actions x_tau and the velocity target eps - A; tau is [B] and broadcasts over the chunk."""
    t = tau.view(-1, *([1] * (actions.ndim - 1)))
    return t * noise + (1.0 - t) * actions, noise - actions
