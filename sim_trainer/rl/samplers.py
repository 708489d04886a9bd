"""Stochastic denoising transitions and their log-densities (openpi time: tau = 1 is noise, 0 is data).

The inner MDP: state (s, x_k, tau_k), action x_{k+1}. Each sampler turns the deterministic Euler step
x_{k+1} = x_k - delta * v(x_k, tau_k) into a Gaussian transition N(mean_k, std_k^2):

- flow_noise: mean = the Euler step, std from a learned head (per token, band [std_min, std_max]).
- reinflow:   the same mean, std from (observation, tau) only.
- flow_sde:   the ODE turned into an SDE with the same marginals,
              sigma_tau = a * sqrt(tau / (1 - tau))        (1 - tau -> 1/K at tau = 1),
              mean = x - delta v - sigma^2 delta / (2 tau) * (x + (1 - tau) v),  std = sigma * sqrt(delta).

Sampling and log-prob recomputation both take tau_k from models.flow.time_grid.
"""

from __future__ import annotations

import math

import torch

NOISE_METHODS = ("flow_noise", "flow_sde", "reinflow")
SDE_MODES = ("mixed", "full")
LOG_2PI = math.log(2 * math.pi)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Elementwise log N(x; mean, std^2), always in float32."""
    x, mean, std = x.float(), mean.float(), std.float()
    return -0.5 * ((x - mean) / std).pow(2) - torch.log(std) - 0.5 * LOG_2PI


def gaussian_entropy(std: torch.Tensor) -> torch.Tensor:
    return 0.5 * (LOG_2PI + 1.0) + torch.log(std.float())


def sde_sigma(tau: torch.Tensor, noise_level: float, num_steps: int) -> torch.Tensor:
    """sigma_tau = a * sqrt(tau / (1 - tau)); at tau = 1 the denominator becomes 1 - tau_1 = 1/K (finite)."""
    one_minus = torch.where(tau >= 1.0, torch.full_like(tau, 1.0 / num_steps), 1.0 - tau)
    return noise_level * torch.sqrt(tau / one_minus)


def sde_transition(x: torch.Tensor, v: torch.Tensor, tau: torch.Tensor, num_steps: int,
                   noise_level: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of one Flow-SDE step; x, v: [B, H, A], tau: [B]."""
    delta = 1.0 / num_steps
    t = tau.view(-1, 1, 1)
    sigma = sde_sigma(tau, noise_level, num_steps).view(-1, 1, 1)
    mean = x - delta * v - sigma.pow(2) * delta / (2 * t) * (x + (1 - t) * v)
    return mean, (sigma * math.sqrt(delta)).expand_as(x)


def stochastic_steps(method: str, sde_mode: str, batch: int, num_steps: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, K] bool: which denoising transitions are sampled (and scored); the rest are plain ODE steps.

    Mixed Flow-SDE draws one step per sample (RLinf draws one per call for all envs: less diverse).
    """
    if method == "flow_sde" and sde_mode == "mixed":
        k = torch.randint(0, num_steps, (batch,), generator=generator)
        return torch.nn.functional.one_hot(k, num_steps).bool()
    return torch.ones(batch, num_steps, dtype=torch.bool)


def chain_log_prob(x0: torch.Tensor, step_terms: torch.Tensor, stochastic: torch.Tensor,
                   joint: bool) -> torch.Tensor:
    """Per-element log-prob of a stored chain, [B, H, A] float32.

    step_terms: [B, K, H, A] log N(x_{k+1}; mean_k, std_k^2) (ignored where not stochastic).
    joint: every step is stochastic, and the x_0 ~ N(0, I) term is included; the K + 1 terms are
    averaged (RLinf's scale). Otherwise (mixed Flow-SDE) the single stochastic term is returned.
    """
    mask = stochastic.view(*stochastic.shape, 1, 1).float()
    total = (step_terms * mask).sum(1)
    if not joint:
        return total
    init = gaussian_log_prob(x0, torch.zeros_like(x0), torch.ones_like(x0))
    return (init + total) / (stochastic.shape[1] + 1)
