"""pi0.5: pi0's backbone with the state in the prompt and flow time entering the expert through adaRMSNorm.

Prompt: "Task: {instruction}, State: {bins};\\nAction: " where the quantile-normalised state is cut into 256
bins over [-1, 1] (LeRobot 0.4.x pads the state to max_state_dim before cutting it; `state_prompt_dims` =
"robot" writes only the robot's dims, as openpi does). There is no state token; the action tokens are
action_in_proj(x), and swish(time_mlp_out(swish(time_mlp_in(sincos(tau))))) conditions every expert norm.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from sim_trainer.models.vla.common import PaliGemmaFlowPolicy, VLAConfig, pad_last, sincos_time


def discretize_state(state_normed: np.ndarray) -> np.ndarray:
    """256 bins over [-1, 1]: integers -1..255 (values below -1 give -1)."""
    return np.digitize(state_normed, bins=np.linspace(-1, 1, 256 + 1)[:-1]) - 1


class Pi05(PaliGemmaFlowPolicy):
    checkpoint_renames = {"action_time_mlp_in.": "time_mlp_in.", "action_time_mlp_out.": "time_mlp_out."}

    def __init__(self, cfg: VLAConfig, state_norm, action_norm, tokenizer=None):
        self.time_cond_dim = cfg.expert.width
        super().__init__(cfg, state_norm, action_norm, tokenizer)
        we = cfg.expert.width
        self.time_mlp_in = nn.Linear(we, we)
        self.time_mlp_out = nn.Linear(we, we)

    def prompt(self, instructions: list[str], state: torch.Tensor | None) -> list[str]:
        if state is None:
            raise ValueError("pi0.5 writes the state into its prompt: tokenize() needs the state")
        s = self.state_norm(state.float()).float().cpu()
        if self.cfg.extra.get("state_prompt_dims", "padded") == "padded":
            s = pad_last(s, self.cfg.max_state_dim)
        bins = discretize_state(s.detach().numpy())
        out = []
        for text, row in zip(instructions, bins, strict=True):
            clean = text.strip().replace("_", " ").replace("\n", " ")
            out.append(f"Task: {clean}, State: {' '.join(map(str, row))};\nAction: ")
        return out

    def action_tokens(self, x: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.action_in_proj(x.to(self.action_in_proj.weight.dtype))
        t = sincos_time(tau, a.shape[-1], self.cfg.min_period, self.cfg.max_period).to(self.time_mlp_in.weight.dtype)
        return a, F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(t))))
