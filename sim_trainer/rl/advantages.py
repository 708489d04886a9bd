"""Advantage estimators over chunk steps: GAE (PPO) and group-normalised returns (GRPO)."""

from __future__ import annotations

import torch


def gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, last_value: torch.Tensor,
        gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation; tensors are [T, N] with dones[t] = the episode ended during step t.

    A truncated episode's bootstrap gamma * V(s_final) must already be folded into its last reward; the
    value after a done step is the next episode's and is cut by (1 - done). Returns (advantages, returns).
    """
    steps = rewards.shape[0]
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(last_value)
    for t in reversed(range(steps)):
        next_value = last_value if t == steps - 1 else values[t + 1]
        not_done = 1.0 - dones[t].float()
        delta = rewards[t] + gamma * next_value * not_done - values[t]
        running = delta + gamma * lam * not_done * running
        adv[t] = running
    return adv, adv + values


def grpo_advantages(returns: torch.Tensor, successes: torch.Tensor, group_size: int,
                    filter_uniform: bool = True, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-episode advantages (R_i - mean_G) / (std_G + eps) for envs in consecutive groups of group_size.

    std_G is the unbiased sample std (divisor G - 1), as in the reference GRPO: with G = 2 the two advantages
    are +-1/sqrt(2) rather than +-1. Groups where every episode succeeded or every one failed carry no signal
    about what works; with filter_uniform they are dropped (keep mask False). Returns (advantages [N], keep [N] bool).
    """
    n = returns.shape[0]
    if n % group_size:
        raise ValueError(f"{n} episodes do not split into groups of {group_size}")
    r = returns.float().view(-1, group_size)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=True, keepdim=True) + eps)
    keep = torch.ones_like(r, dtype=torch.bool)
    if filter_uniform:
        s = successes.view(-1, group_size)
        uniform = s.all(1) | ~s.any(1)
        keep &= ~uniform.unsqueeze(1)
    return adv.view(n), keep.view(n)


def trajectory_weights(valid: torch.Tensor) -> torch.Tensor:
    """[T, N] loss weights that give every trajectory (env column) the same total weight 1.

    A plain mean over valid chunk steps would let long (often failed, full-length) episodes dominate; this is
    the mean over each trajectory's own steps, then over trajectories. Columns with no valid step get 0.
    """
    v = valid.float()
    return v / v.sum(0, keepdim=True).clamp_min(1.0)
