"""Advantage estimators over chunk steps: GAE (PPO) and group-normalised returns (GRPO).

Both take `risk_beta` B for the entropic objective J_B = (1/B) log E[exp(B * return)] (B > 0 risk-seeking,
B < 0 risk-averse; J_B -> E[return] as B -> 0). B = 0 runs the risk-neutral code exactly; see docs/rl.md.
"""

from __future__ import annotations

import torch


def exp_utility(x: torch.Tensor, beta: float) -> torch.Tensor:
    """u_B(x) = (exp(B x) - 1) / B, the exponential utility with u(0) = 0 and u'(0) = 1; x itself at B = 0.

    expm1 keeps it accurate for small B x, so u_B -> x continuously as B -> 0 (u_B(x) = x + B x^2 / 2 + ...).
    """
    return x if beta == 0 else torch.expm1(beta * x) / beta


def gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, last_value: torch.Tensor,
        gamma: float, lam: float, risk_beta: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation; tensors are [T, N] with dones[t] = the episode ended during step t.

    A truncated episode's bootstrap gamma * V(s_final) must already be folded into its last reward; the
    value after a done step is the next episode's and is cut by (1 - done). Returns (advantages, returns).

    Risk-sensitive (B != 0): every TD error delta = r + gamma V(s') - V(s) becomes the exponential TD error
    u_B(delta) = (exp(B delta) - 1) / B before the lambda-sum, and the value targets (advantages + values)
    follow it. The critic's fixed point, E[u_B(delta) | s] = 0, is E[exp(B (r + gamma V(s')))] = exp(B V(s)),
    i.e. the entropic Bellman equation V(s) = (1/B) log E[exp(B (r + gamma V(s')))].
    """
    steps = rewards.shape[0]
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(last_value)
    for t in reversed(range(steps)):
        next_value = last_value if t == steps - 1 else values[t + 1]
        not_done = 1.0 - dones[t].float()
        delta = exp_utility(rewards[t] + gamma * next_value * not_done - values[t], risk_beta)
        running = delta + gamma * lam * not_done * running
        adv[t] = running
    return adv, adv + values


def grpo_advantages(returns: torch.Tensor, successes: torch.Tensor, group_size: int,
                    filter_uniform: bool = True, eps: float = 1e-6,
                    risk_beta: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-episode advantages (R_i - mean_G) / (std_G + eps) for envs in consecutive groups of group_size.

    std_G is the unbiased sample std (divisor G - 1), as in the reference GRPO: with G = 2 the two advantages
    are +-1/sqrt(2) rather than +-1. Groups where every episode succeeded or every one failed carry no signal
    about what works; with filter_uniform they are dropped (keep mask False). Returns (advantages [N], keep [N] bool).

    Risk-sensitive (B != 0): R_i is replaced by its exponential utility u_i = u_B(R_i - c) before the
    normalisation, with c the group's best return for B > 0 and its worst for B < 0 (so exp never overflows).
    Why this is the entropic gradient: for the group's start state, grad J_B = E[exp(B R) grad log pi] /
    (B E[exp(B R)]) = E[(exp(B R) - b) grad log pi] / (B M) for any baseline b, with M = E[exp(B R)]. Taking
    b = the group mean of exp(B R_j), M as that mean too, the weight of episode i is
    w_i = (exp(B R_i) - mean_j exp(B R_j)) / (B M). And u_i - mean_j u_j = exp(-B c) (exp(B R_i) - mean_j
    exp(B R_j)) / B = exp(-B c) M w_i: the same weights times a positive per-group factor, which dividing by
    std_G(u) (itself proportional to exp(-B c)) turns into another positive per-group factor. So c and the
    "-1" of u_B drop out, and the update is the entropic-objective gradient up to a positive per-group scale,
    the same freedom the risk-neutral GRPO takes. At B = 0 this is the code above, bit for bit.
    """
    n = returns.shape[0]
    if n % group_size:
        raise ValueError(f"{n} episodes do not split into groups of {group_size}")
    r = returns.float().view(-1, group_size)
    if risk_beta:
        anchor = r.amax(1, keepdim=True) if risk_beta > 0 else r.amin(1, keepdim=True)
        r = exp_utility(r - anchor, risk_beta)
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
