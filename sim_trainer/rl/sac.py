"""Soft actor-critic over action chunks with a flow actor (SAC Flow), as one readable update.

Critic: twin Q networks over (observation features, executed chunk), each regressed on

    y = r + gamma^steps * (1 - done + truncated) * (min_i Q_target_i(o', a') - alpha * log pi(a' | o')),

with a' drawn from the current actor at the n-step next observation o' (see replay.py for r, steps, done,
truncated). Targets follow the online critics by Polyak averaging, theta_target <- theta_target +
tau * (theta - theta_target), after every critic update.

Actor, every `policy_delay` critic updates: minimise alpha * log pi(a | o) - min_i Q_i(o, a), reparameterised
through all K flow steps (log pi is the chain's exact log-density, flow_velocity.py). Temperature: log alpha
minimises -log alpha * (log pi + target_entropy), so alpha rises when the policy's entropy falls below the target.

All parameters share one Adam optimiser in three groups (actor, critic, log_alpha); each loss back-propagates
only into its own group (`backward(inputs=...)`), so the actor's loss never moves the critics.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from sim_trainer.rl.flow_velocity import FlowActor, GaussianActor, mlp


@dataclass
class SACSettings:
    gamma: float = 0.99  # per chunk step
    tau: float = 0.005
    actor_lr: float = 3e-4
    critic_lr: float = 1e-3
    alpha_lr: float = 3e-4
    alpha_init: float = 0.2
    target_entropy: float | None = None  # None: the actor's default_target_entropy(), else -(H * D)
    policy_delay: int = 2  # critic updates per actor (and temperature) update
    critic_warmup: int = 0  # critic updates before the first actor update (a pretrained actor must not follow an
    #                         untrained critic's gradients)
    max_grad_norm: float = 10.0
    hidden: int = 256
    backbone_lr: float = 1e-5  # a pretrained backbone's own weights (BackboneFlowActor); its new gate: actor_lr


class TwinQ(nn.Module):
    def __init__(self, obs_dim: int, chunk_dim: int, hidden: int):
        super().__init__()
        self.q1 = mlp(obs_dim + chunk_dim, hidden, 1)
        self.q2 = mlp(obs_dim + chunk_dim, hidden, 1)

    def forward(self, obs: torch.Tensor, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([obs, chunk.flatten(1)], dim=-1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


def _actor_groups(actor: nn.Module, s: SACSettings) -> list[dict]:
    """The actor's new parts (heads, gate or decoder) learn at actor_lr; a pretrained backbone's own weights at
    backbone_lr."""
    backbone = getattr(actor, "model", None)
    new = ("velocity_gate.", "velocity_decoder.")
    pretrained = ({id(p) for n, p in backbone.named_parameters() if not n.startswith(new)}
                  if backbone is not None else set())
    groups = [{"params": [p for p in actor.parameters() if id(p) not in pretrained], "lr": s.actor_lr}]
    if pretrained:
        groups.append({"params": [p for p in actor.parameters() if id(p) in pretrained], "lr": s.backbone_lr})
    return groups


@torch.no_grad()
def polyak(target: nn.Module, online: nn.Module, tau: float) -> None:
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.lerp_(o, tau)


class SAC:
    def __init__(self, actor: FlowActor | GaussianActor, obs_dim: int, exec_steps: int, settings: SACSettings):
        self.actor, self.s, self.exec_steps = actor, settings, exec_steps
        self.critic = TwinQ(obs_dim, exec_steps * actor.action_dim, settings.hidden).to(actor.action_mid.device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(settings.alpha_init), device=actor.action_mid.device))
        default = (actor.default_target_entropy() if hasattr(actor, "default_target_entropy")
                   else -float(actor.horizon * actor.action_dim))
        self.target_entropy = settings.target_entropy if settings.target_entropy is not None else default
        self.opt = torch.optim.Adam([
            *_actor_groups(actor, settings),
            {"params": list(self.critic.parameters()), "lr": settings.critic_lr},
            {"params": [self.log_alpha], "lr": settings.alpha_lr}])
        self.critic_updates = 0

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.exp().detach()

    def executed(self, chunk: torch.Tensor) -> torch.Tensor:
        """The part of a sampled chunk [B, H, D] that runs in the env (and that the critic scores): its first C."""
        return chunk[:, :self.exec_steps]

    def _step(self, loss: torch.Tensor, params: list[nn.Parameter], clipped: list[nn.Parameter]) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss.backward(inputs=params)
        norm = nn.utils.clip_grad_norm_(clipped, self.s.max_grad_norm)
        self.opt.step()  # parameters without a gradient (the other groups) are left alone
        return float(norm)

    @torch.no_grad()
    def td_target(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """y: the n-step reward plus the discounted soft value of the next observation, unless the episode ended
        other than by the time limit."""
        next_obs = batch["next_obs"]
        next_chunk, _, next_logp = self.actor(next_obs, generator=generator)
        q1, q2 = self.critic_target(next_obs, self.executed(next_chunk))
        soft_value = torch.min(q1, q2) - self.alpha * next_logp
        bootstrap = (~batch["done"] | batch["truncated"]).float()
        return batch["reward"] + self.s.gamma ** batch["steps"].float() * bootstrap * soft_value

    def update(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict[str, float]:
        """One critic update, then (every policy_delay-th) an actor and temperature update, then the targets."""
        obs, target = batch["obs"], self.td_target(batch, generator)
        q1, q2 = self.critic(obs, batch["chunk"])
        critic_loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
        metrics = {"critic_loss": float(critic_loss.detach()), "q_mean": float(q1.detach().mean()),
                   "critic_grad_norm": self._step(critic_loss, *[list(self.critic.parameters())] * 2)}
        self.critic_updates += 1
        if self.critic_updates > self.s.critic_warmup and self.critic_updates % self.s.policy_delay == 0:
            metrics |= self._update_actor(obs, generator)
        polyak(self.critic_target, self.critic, self.s.tau)
        return metrics

    def _update_actor(self, obs: torch.Tensor, generator: torch.Generator | None) -> dict[str, float]:
        chunk, chain, logp = self.actor(obs, generator=generator)
        q1, q2 = self.critic(obs, self.executed(chunk))
        actor_loss = (self.alpha * logp - torch.min(q1, q2)).mean()
        if hasattr(self.actor, "regulariser"):  # a backbone actor's pull towards its starting policy (0 when off)
            actor_loss = actor_loss + self.actor.regulariser(obs, chain)
        alpha_loss = -(self.log_alpha * (logp.detach() + self.target_entropy)).mean()
        actor_params = [p for p in self.actor.parameters() if p.requires_grad]
        norm = self._step(actor_loss + alpha_loss, actor_params + [self.log_alpha], actor_params)
        return {"actor_loss": float(actor_loss.detach()), "alpha": float(self.alpha),
                "log_prob": float(logp.detach().mean()), "actor_grad_norm": norm}

    def parts(self) -> dict[str, dict[str, torch.Tensor]]:
        """Named tensors to save (trainer_state.save_training), besides the optimiser."""
        return {"actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                "critic_target": self.critic_target.state_dict(), "alpha": {"log_alpha": self.log_alpha.detach()}}

    def load_parts(self, parts: dict[str, dict[str, torch.Tensor]]) -> None:
        self.actor.load_state_dict(parts["actor"])
        self.critic.load_state_dict(parts["critic"])
        self.critic_target.load_state_dict(parts["critic_target"])
        with torch.no_grad():
            self.log_alpha.copy_(parts["alpha"]["log_alpha"])
