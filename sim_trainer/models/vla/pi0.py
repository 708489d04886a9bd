"""pi0: PaliGemma prefix, Gemma action expert, one state token, flow time fused into each action token by an MLP.

Prompt: the instruction followed by a newline. The normalised state (padded to max_state_dim) becomes one
expert token after the prefix that only the actions see; each noisy action token is
action_time_mlp_out(swish(action_time_mlp_in([action_in_proj(x), sincos(tau)]))).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from policy_runtime.contract import PROMPTS
from sim_trainer.models.vla.common import PaliGemmaFlowPolicy, VLAConfig, sincos_time


class Pi0(PaliGemmaFlowPolicy):
    # openpi-era files may call pi0's action-time MLP time_mlp_*
    checkpoint_renames = {"time_mlp_in.": "action_time_mlp_in.", "time_mlp_out.": "action_time_mlp_out."}

    def __init__(self, cfg: VLAConfig, state_norm, action_norm, tokenizer=None):
        super().__init__(cfg, state_norm, action_norm, tokenizer)
        we = cfg.expert.width
        self.state_proj = nn.Linear(cfg.max_state_dim, we)
        self.action_time_mlp_in = nn.Linear(2 * we, we)
        self.action_time_mlp_out = nn.Linear(we, we)

    def prompt(self, instructions: list[str]) -> list[str]:
        return [PROMPTS["pi0"](t) for t in instructions]

    def state_tokens(self, state_normed: torch.Tensor) -> torch.Tensor:
        return self.state_proj(state_normed.to(self.state_proj.weight.dtype))[:, None, :]

    def action_tokens(self, x: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, None]:
        a = self.action_in_proj(x.to(self.action_in_proj.weight.dtype))
        t = sincos_time(tau, a.shape[-1], self.cfg.min_period, self.cfg.max_period)
        h = torch.cat([a, t[:, None, :].expand_as(a).to(a.dtype)], dim=2)
        return self.action_time_mlp_out(F.silu(self.action_time_mlp_in(h))), None
