"""A checkpoint as an actor: observations in, action chunks out (raw units, clipped to the action bounds)."""

from __future__ import annotations

import torch

from sim_trainer.envs.spec import PolicySpec
from sim_trainer.models.flow_vla import FlowVLA
from sim_trainer.models.tokenizer import tokenize


class ChunkPolicy:
    def __init__(self, model: FlowVLA, spec: PolicySpec, num_steps: int | None = None, device: str = "cpu"):
        self.model, self.spec = model.to(device).eval(), spec
        self.device = torch.device(device)
        self.num_steps = num_steps or model.cfg.num_steps
        self.text = tokenize(spec.instruction, model.cfg.max_text_len).to(self.device)
        self.low = torch.tensor(spec.action_low, device=self.device)
        self.high = torch.tensor(spec.action_high, device=self.device)

    @property
    def horizon(self) -> int:
        return self.model.cfg.horizon

    @property
    def exec_steps(self) -> int:
        return self.model.cfg.exec_steps

    @torch.no_grad()
    def act(self, obs: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """obs: {"state": [B, S], "images": {cam: uint8 [B, H, W, 3]}} -> chunk [B, H, A]."""
        state = obs["state"].to(self.device).float()
        b = state.shape[0]
        images = {k: v.to(self.device) for k, v in obs["images"].items()}
        noise = torch.randn((b, self.horizon, self.spec.action_dim), generator=generator).to(self.device)
        text = self.text.expand(b, -1)
        chunk = self.model.sample_actions(images, state, text, noise, self.num_steps)
        return torch.maximum(torch.minimum(chunk, self.high), self.low)
