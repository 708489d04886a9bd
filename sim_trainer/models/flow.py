"""Flow-matching conventions, in one place (openpi's: tau = 1 is noise, tau = 0 is data).

Training:  x_tau = tau * eps + (1 - tau) * A,  target velocity u = eps - A.
Sampling:  tau_k = 1 - k / K for k = 0..K-1, x_{k+1} = x_k - (1/K) * v(x_k, tau_k).
Sampling, RL log-prob recomputation and export all take the grid from `time_grid`, so they cannot
drift apart (a public implementation fed different grids to sampling and log-probs).

Shortcut models (Frans et al., "One Step Diffusion via Shortcut Models") also condition the velocity on the
step size d: v(x, tau, d) is the mean velocity over one step of size d, so x - d * v(x, tau, d) lands where
the flow from tau lands at tau - d. Sampling with K steps uses d = 1/K. Training: flow matching at the finest
step d = 2^-SHORTCUT_LEVELS, plus self-consistency: one 2d-step is the mean of two consecutive d-steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def time_grid(num_steps: int) -> torch.Tensor:
    """tau_0..tau_{K-1}, decreasing from 1 (noise) in steps of 1/K; the final tau_K = 0 is implicit."""
    if num_steps < 1:
        raise ValueError(f"number of denoising steps must be >= 1, got {num_steps}")
    return 1.0 - torch.arange(num_steps, dtype=torch.float32) / num_steps


SHORTCUT_LEVELS = 7  # step sizes d are powers of two down to 2^-7 = 1/128
FINEST_STEP = 2.0 ** -SHORTCUT_LEVELS  # the d that flow matching trains (the instantaneous velocity's stand-in)


def sample_tau(batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training times, skewed towards noise as in pi0: tau = 0.001 + 0.999 * Beta(1.5, 1)."""
    u = torch.rand(batch, generator=generator)
    beta_1p5_1 = u ** (1.0 / 1.5)  # inverse CDF of Beta(1.5, 1): F(x) = x^1.5
    return 0.001 + 0.999 * beta_1p5_1


def interpolate(actions: torch.Tensor, noise: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy actions x_tau and the velocity target eps - A; tau is [B] and broadcasts over the chunk."""
    t = tau.view(-1, *([1] * (actions.ndim - 1)))
    return t * noise + (1.0 - t) * actions, noise - actions


def sample_consistency_steps(batch: int, generator: torch.Generator | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-consistency pairs (tau, d): d uniform over 1/128..1/2 (powers of two), so the target's step 2d is
    1/64..1, and tau uniform over 2d's own grid {2d, 4d, .., 1} (the 2d-step from tau ends at or after tau = 0)."""
    level = torch.randint(1, SHORTCUT_LEVELS + 1, (batch,), generator=generator)
    d = 2.0 ** -level.float()
    big_steps = 2 ** (level - 1)  # 1 / (2d)
    k = (torch.rand(batch, generator=generator) * big_steps).floor()
    return (k + 1) * 2 * d, d


def self_consistency_target(velocity, x: torch.Tensor, tau: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The velocity target of one step of size 2d from x at tau: the mean of two consecutive d-steps'.

    velocity(x, tau, d) -> [B, H, A]; x - 2d * target is then exactly where the two d-steps land.
    """
    v1 = velocity(x, tau, d)
    v2 = velocity(x - d.view(-1, 1, 1) * v1, tau - d, d)
    return (v1 + v2) / 2


def euler_denoise(velocity: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                  num_steps: int) -> torch.Tensor:
    """K Euler steps from x_0 = noise (tau = 1) to a normalised chunk (tau = 0); velocity(x, tau, d) gets tau and the
    step size d = 1/K as [B] tensors (at least float32: bf16 flow times would be coarse)."""
    x, dt = noise, 1.0 / num_steps
    for tau_k in time_grid(num_steps).tolist():
        tau = torch.full((x.shape[0],), tau_k, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        x = x - dt * velocity(x, tau, torch.full_like(tau, dt))
    return x


def masked_mse(v: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over valid chunk steps (padding past an episode's end excluded), in fp32 (v may come
    from a bf16 autocast forward)."""
    err = (v.float() - target.float()).pow(2).mean(-1)  # [B, H]
    if valid is None:
        return err.mean()
    w = valid.to(err.dtype)
    return (err * w).sum() / w.sum().clamp_min(1.0)
