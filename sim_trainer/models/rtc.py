"""Guided real-time chunking (RTC, Black et al. 2025) for the flow VLA, in openpi time (tau = 1 is noise).

While a chunk executes, the next one is computed from a newer observation. Its first d actions will be
executed before it arrives, so they must equal what the robot is already doing (the leftover Y of the
previous chunk); the following actions should blend into it. At every denoising step the clean-action
estimate A_hat = x - tau * v is pulled toward Y with per-step weights W by a vector-Jacobian product
through the action expert (one backward pass per step; the prefix cache is reused).
"""

from __future__ import annotations

import math

import torch

from sim_trainer.models.flow import time_grid
from sim_trainer.models.interface import FlowPolicy, PrefixCache


def prefix_weights(horizon: int, delay: int, exec_steps: int) -> torch.Tensor:
    """W_i: 1 for the d frozen steps, exponential decay over the overlap up to H - s, then 0 (RTC eq. 5)."""
    w = torch.zeros(horizon)
    w[:delay] = 1.0
    end = horizon - exec_steps
    for i in range(delay, max(delay, end)):
        c = (end - i) / (end - delay + 1)
        w[i] = c * (math.exp(c) - 1) / (math.e - 1)
    return w


def guidance_scale(tau: float, max_weight: float) -> float:
    """min(beta, ((1-t)/t) * (t^2 + (1-t)^2) / (1-t)^2) with t = 1 - tau (the paper's time, 0 = noise)."""
    t = 1.0 - tau
    if t <= 0.0:
        return max_weight
    if t >= 1.0:
        return 0.0
    return min(max_weight, ((1 - t) / t) * (t * t + (1 - t) ** 2) / (1 - t) ** 2)


def guided_denoise(model: FlowPolicy, cache: PrefixCache, noise: torch.Tensor, num_steps: int,
                   leftover: torch.Tensor, weights: torch.Tensor, max_weight: float = 5.0) -> torch.Tensor:
    """K Euler steps whose clean-action estimate is guided toward `leftover` (normalised, [B, H, A])."""
    x, dt = noise, 1.0 / num_steps
    w = weights.to(x).view(1, -1, 1)
    for tau_k in time_grid(num_steps).tolist():
        tau = torch.full((x.shape[0],), tau_k, dtype=x.dtype, device=x.device)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            v = model.velocity(cache, xg, tau, torch.full_like(tau, dt))
            a_hat = xg - tau_k * v
            err = w * (leftover - a_hat)
            (grad,) = torch.autograd.grad(a_hat, xg, grad_outputs=err)
        x = x - dt * (v.detach() - guidance_scale(tau_k, max_weight) * grad)
    return x
