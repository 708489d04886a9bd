"""PPO/GRPO losses on one minibatch: clipped surrogate, clipped Huber value loss, entropy bonus."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reduce_log_prob(log_prob: torch.Tensor, exec_steps: int, level: str) -> torch.Tensor:
    """Crop [B, H, A] element log-probs to the executed block (first C actions) and sum to the ratio's unit.

    token: [B, C, A] one ratio per element; action: [B, C] one per action; chunk: [B] one per chunk.
    """
    lp = log_prob[:, :exec_steps].float()
    if level == "token":
        return lp
    if level == "action":
        return lp.sum(-1)
    return lp.sum((1, 2))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x weighted by mask (bool or float weights, broadcast over x's trailing dims)."""
    m = mask.float().expand_as(x)
    return (x * m).sum() / m.sum().clamp_min(1.0)


def policy_loss(new_lp: torch.Tensor, old_lp: torch.Tensor, adv: torch.Tensor, weight: torch.Tensor,
                clip: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate, weighted mean; adv and weight (or a validity mask) are [B] and broadcast over the
    ratio's unit. Ratio in float32."""
    shape = (-1,) + (1,) * (new_lp.ndim - 1)
    a, m = adv.float().view(shape), weight.view(shape)
    log_ratio = new_lp.float() - old_lp.float()
    ratio = log_ratio.exp()
    surrogate = torch.max(-a * ratio, -a * ratio.clamp(1 - clip, 1 + clip))
    with torch.no_grad():
        clip_frac = masked_mean(((ratio - 1).abs() > clip).float(), m)
        approx_kl = masked_mean((ratio - 1) - log_ratio, m)
    return masked_mean(surrogate, m), ratio.detach(), clip_frac, approx_kl


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, valid: torch.Tensor,
               clip: float, huber_delta: float) -> torch.Tensor:
    """max(Huber(R - V), Huber(R - V_clipped)) with V_clipped = V_old + clip(V - V_old, +-clip)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    a = F.huber_loss(values, returns, reduction="none", delta=huber_delta)
    b = F.huber_loss(clipped, returns, reduction="none", delta=huber_delta)
    return masked_mean(torch.max(a, b), valid)


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    var = returns.var()
    return float("nan") if var <= 0 else float(1 - (returns - values).var() / var)
