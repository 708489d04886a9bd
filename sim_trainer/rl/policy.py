"""The flow VLA as a stochastic RL policy: chain sampling with behaviour log-probs, their recomputation,
entropy and the value.

A rollout stores the whole chain x_0..x_K and which steps were stochastic; the learner recomputes the
transition densities from the stored x_k with the same time grid. In joint modes all K transitions are
recomputed in one batched action-expert call; in mixed Flow-SDE only the stochastic one is.

With precision bf16 the model's forward passes (prefix encoding, the action expert) run under bf16 autocast and
their outputs are cast to fp32 at once: the noise and value heads, the transition means and stds, and every
log-density are fp32, so the learner's recomputation sees the numbers the rollout saw.

Only `value()` may read obs["privileged"] (the simulator's true state, --value-input privileged): the actor's
sampling, log-probs, entropy and deterministic actions go through `encode()`, which reads the state and images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sim_trainer.models.flow import time_grid
from sim_trainer.models.interface import FlowPolicy, PrefixCache
from sim_trainer.models.precision import autocast
from sim_trainer.rl.heads import ObsTimeNoiseHead, PrivilegedValueHead, TokenNoiseHead, ValueHead
from sim_trainer.rl.samplers import (
    chain_log_prob,
    gaussian_entropy,
    gaussian_log_prob,
    sde_transition,
    stochastic_steps,
)

VALUE_INPUTS = ("prefix", "expert", "privileged")
# What the rollout and the learner call on the policy from outside (besides forward, the critic's V(s)): with --fsdp
# each gathers the sharded weights while it runs. Nothing inside the policy calls them, so gathers never nest.
FSDP_METHODS = ("sample", "evaluate_chain", "cotrain_loss")


@dataclass(frozen=True)
class SamplerSettings:
    method: str = "flow_noise"  # flow_noise | flow_sde | reinflow
    num_steps: int = 4  # K
    sde_mode: str = "mixed"  # flow_sde: one stochastic step per sample, or every step
    noise_level: float = 0.5  # flow_sde: a
    std_min: float = 0.08  # flow_noise / reinflow std band
    std_max: float = 0.16

    @property
    def joint(self) -> bool:
        return not (self.method == "flow_sde" and self.sde_mode == "mixed")


@dataclass
class ChainSample:
    chain: torch.Tensor  # [B, K+1, H, A] normalised x_0..x_K
    stochastic: torch.Tensor  # [B, K] bool
    log_prob: torch.Tensor  # [B, H, A] float32, behaviour
    actions: torch.Tensor  # [B, H, A] raw units, clipped to the action bounds
    value: torch.Tensor  # [B]


@dataclass
class ChainEval:
    log_prob: torch.Tensor  # [B, H, A] float32
    entropy: torch.Tensor  # [B, H, A] mean over the stochastic steps
    std: torch.Tensor  # [B, H, A] mean std over the stochastic steps
    value: torch.Tensor  # [B]


class RLPolicy(nn.Module):
    def __init__(self, model: FlowPolicy, sampler: SamplerSettings, value_input: str, action_low: torch.Tensor,
                 action_high: torch.Tensor, privileged_dim: int = 0, precision: str = "fp32"):
        super().__init__()
        self.model, self.sampler, self.value_input, self.precision = model, sampler, value_input, precision
        cfg = model.cfg
        if sampler.method == "flow_noise":
            self.noise_head: nn.Module | None = TokenNoiseHead(model.feature_dim, cfg.action_dim, sampler.std_min,
                                                               sampler.std_max)
        elif sampler.method == "reinflow":
            self.noise_head = ObsTimeNoiseHead(model.pooled_dim, cfg.horizon, cfg.action_dim, sampler.std_min,
                                               sampler.std_max)
        else:
            self.noise_head = None
        if value_input == "privileged":
            if privileged_dim < 1:
                raise ValueError("a privileged value head needs the length of the privileged state")
            self.value_head: nn.Module = PrivilegedValueHead(privileged_dim)
        else:
            self.value_head = ValueHead(model.pooled_dim if value_input == "prefix" else model.feature_dim)
        self.register_buffer("action_low", action_low)
        self.register_buffer("action_high", action_high)
        self.register_buffer("grid", time_grid(sampler.num_steps))

    # ----- pieces ------------------------------------------------------------------------------------
    def autocast(self):
        """The context of the model's forward passes: bf16 autocast on the policy's device, or nothing (fp32)."""
        return autocast(self.precision, self.action_low.device)

    def encode(self, obs: dict, text: torch.Tensor) -> PrefixCache:
        state = obs["state"].float()
        with self.autocast():
            return self.model.encode_prefix(obs["images"], state, text.expand(state.shape[0], -1))

    def expert(self, cache: PrefixCache, x: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The action expert's velocity and per-token features at (x, tau), in fp32."""
        with self.autocast():
            v, feats = self.model.expert_forward(cache, x, tau, self.step_size(tau))
        return v.float(), feats.float()

    def value(self, obs: dict, text: torch.Tensor, cache: PrefixCache | None = None) -> torch.Tensor:
        """V(s) on inputs that depend on the observation only (never on the action noise): the simulator's privileged
        state, or detached actor features (`cache`: the observation's prefix, if the caller encoded it already)."""
        if self.value_input == "privileged":
            return self.value_head(obs["privileged"].float())
        if cache is None:
            cache = self.encode(obs, text)
        if self.value_input == "prefix":
            feats = cache.pooled.float()
        else:  # the action expert at tau = 1 on the mean of the noise (zeros), mean-pooled over tokens
            b = cache.mask.shape[0]
            x = torch.zeros(b, self.model.cfg.horizon, self.model.cfg.action_dim, device=cache.mask.device)
            tau = torch.ones(b, device=x.device)
            feats = self.expert(cache, x, tau)[1].mean(1)
        return self.value_head(feats.detach())

    def forward(self, obs: dict, text: torch.Tensor) -> torch.Tensor:
        """V(s) alone: the rollout's bootstrap values (under FSDP, forward gathers the weights like FSDP_METHODS)."""
        return self.value(obs, text)

    def cotrain_loss(self, images: dict, state: torch.Tensor, text: torch.Tensor, actions: torch.Tensor,
                     valid: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """RL-Co: the model's flow-matching loss on demonstrations (called on the policy, so FSDP can gather), under
        the run's autocast (the loss itself is fp32: masked_mse)."""
        with self.autocast():
            return self.model.flow_matching_loss(images, state, text, actions, valid=valid, generator=generator)

    def step_size(self, tau: torch.Tensor) -> torch.Tensor:
        """d = 1/K for every sample: what a shortcut model is conditioned on (a plain model ignores it)."""
        return torch.full_like(tau, 1.0 / self.sampler.num_steps)

    def transition(self, cache: PrefixCache, x: torch.Tensor, tau: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, std) of the stochastic transition from x at tau, and the plain Euler (ODE) mean."""
        s = self.sampler
        v, feats = self.expert(cache, x, tau)
        ode_mean = x - v / s.num_steps
        if s.method == "flow_sde":
            mean, std = sde_transition(x, v, tau, s.num_steps, s.noise_level)
            return mean, std, ode_mean
        if s.method == "flow_noise":
            return ode_mean, self.noise_head(feats), ode_mean
        return ode_mean, self.noise_head(cache.pooled.float(), tau), ode_mean

    def to_actions(self, x: torch.Tensor) -> torch.Tensor:
        raw = self.model.action_norm.inverse(x)
        return torch.maximum(torch.minimum(raw, self.action_high), self.action_low)

    # ----- rollout -----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, obs: dict, text: torch.Tensor, generator: torch.Generator | None = None) -> ChainSample:
        cache = self.encode(obs, text)
        b = obs["state"].shape[0]
        cfg, k_steps = self.model.cfg, self.sampler.num_steps
        stochastic = stochastic_steps(self.sampler.method, self.sampler.sde_mode, b, k_steps, generator)
        stochastic = stochastic.to(cache.mask.device)
        x = torch.randn(b, cfg.horizon, cfg.action_dim, generator=generator).to(cache.mask.device)
        chain, terms = [x], []
        for k in range(k_steps):
            tau = self.grid[k].expand(b)
            mean, std, ode_mean = self.transition(cache, x, tau)
            eps = torch.randn(x.shape, generator=generator).to(x)
            noisy = mean + std * eps
            x = torch.where(stochastic[:, k].view(-1, 1, 1), noisy, ode_mean)
            terms.append(gaussian_log_prob(x, mean, std))
            chain.append(x)
        log_prob = chain_log_prob(chain[0], torch.stack(terms, 1), stochastic, self.sampler.joint)
        return ChainSample(torch.stack(chain, 1), stochastic, log_prob, self.to_actions(x),
                           self.value(obs, text, cache))

    @torch.no_grad()
    def act_deterministic(self, obs: dict, text: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The deployed policy: plain K-step Euler from the given noise (what evaluation and export run)."""
        cache = self.encode(obs, text)
        with self.autocast():
            chunk = self.model.denoise(cache, noise, self.sampler.num_steps).float()
        return self.to_actions(chunk)

    # ----- learner -----------------------------------------------------------------------------------
    def evaluate_chain(self, obs: dict, text: torch.Tensor, chain: torch.Tensor,
                       stochastic: torch.Tensor) -> ChainEval:
        """Recompute the stored chain's log-prob (with gradients), entropy, mean std and value."""
        cache = self.encode(obs, text)
        b, k_steps = chain.shape[0], self.sampler.num_steps
        rows = torch.arange(b, device=chain.device)
        if self.sampler.joint:
            cache_k = cache.repeat(k_steps)
            x = chain[:, :k_steps].reshape(b * k_steps, *chain.shape[2:])
            tau = self.grid.repeat(b)
            mean, std, _ = self.transition(cache_k, x, tau)
            mean, std = mean.view(b, k_steps, *chain.shape[2:]), std.view(b, k_steps, *chain.shape[2:])
            terms = gaussian_log_prob(chain[:, 1:], mean, std)
            step_mask = stochastic
        else:  # one stochastic transition per sample: score only it
            k = stochastic.float().argmax(1)
            mean, std, _ = self.transition(cache, chain[rows, k], self.grid[k])
            terms = gaussian_log_prob(chain[rows, k + 1], mean, std).unsqueeze(1)
            std = std.unsqueeze(1)
            step_mask = torch.ones(b, 1, dtype=torch.bool, device=chain.device)
        log_prob = chain_log_prob(chain[:, 0], terms, step_mask, self.sampler.joint)
        w = step_mask.view(b, -1, 1, 1).float()
        n = w.sum(1).clamp_min(1.0)
        entropy = (gaussian_entropy(std) * w).sum(1) / n
        mean_std = (std.float() * w).sum(1) / n
        return ChainEval(log_prob, entropy, mean_std, self.value(obs, text, cache))
