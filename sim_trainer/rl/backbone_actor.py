"""SAC Flow's actor on a pretrained flow backbone (`sim-trainer rl --algorithm sac_flow --ckpt SFT`).

The chain runs in the backbone's normalised action space over its whole chunk of H actions, with the backbone's
time grid tau_k = 1 - k / K (tau = 1 is noise) and its velocity v_b:

    x_0 ~ N(0, I),    x_{k+1} = x_k - delta * v(x_k, tau_k, o) + sigma_k(o) * eps_k,    delta = 1 / K,

so with no step noise it is exactly the backbone's own sampler. The velocity is reparameterised as in SAC Flow:
- flow_g: v = z * v_b with z = 2 sigmoid(gate(expert features)) in (0, 2), the gate's weights starting at 0
  (z = 1: the SFT policy). Since v_b = (x - a_hat) / tau, where a_hat is the backbone's estimate of the clean
  chunk, a step is x_{k+1} = x_k + (delta z / tau_k) (a_hat - x_k) with delta / tau_k <= 1: a step towards a_hat that
  never overshoots it by more than it started away (|1 - delta z / tau_k| < 1), the gated, GRU-like update that
  keeps K-step backpropagation stable.
- flow_t: v = v_b + D(features, o) with D a decoder block (self-attention over the chunk's action tokens,
  cross-attention to the pooled prefix, the observation's embedding; pre-LayerNorm) and a zero-initialised output
  layer (D = 0: the SFT policy). The correction is a function of normalised features, not of a sum carried from
  step to step, which is what keeps the decoded velocity stable over K steps.
The gate or decoder lives in the model (`velocity_gate` / `velocity_decoder`), so the fine-tuned checkpoint
evaluates, exports and serves like any other.
- plain: v = v_b, the backbone fine-tuned as it is (the ablation).

Log-density (exact): the Gaussian transitions of the chain, each with its -log sigma terms, plus the constant
change of variables of the de-normalisation u = mean + std * x_K. Bounds: u is clipped into the action bounds
when executed, and the critic scores the clipped chunk; clipping is part of the environment, so the density is
u's, with no correction to add (a tanh squash would move the SFT policy's actions and change the start point).

Optional regulariser (`--sac-bc-coef`, off by default): the squared distance of each step's mean from the frozen
starting policy's on the sampled chain, added to the actor loss.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import torch
from torch import nn

from sim_trainer.data.normalize import NormStats
from sim_trainer.errors import UserError
from sim_trainer.models.flow import time_grid
from sim_trainer.models.flow_vla import FlowVLA
from sim_trainer.models.interface import FlowPolicy, PrefixCache
from sim_trainer.rl.flow_velocity import TIME_DIM, chain_log_density, mlp, sample_chain, time_embedding

# --velocity -> the model config flag that adds its reparameterisation (plain: the backbone as it is)
VELOCITY_FLAGS = {"flow_g": "velocity_gate", "flow_t": "velocity_decoder"}


def with_sac_velocity(model: FlowPolicy, norm: NormStats, velocity: str) -> FlowPolicy:
    """The same model with the velocity reparameterisation of `velocity` added at its identity (a gate at z = 1,
    a decoder whose output is 0), so the same policy; plain returns the model unchanged."""
    flag = VELOCITY_FLAGS.get(velocity)
    if flag is None:
        return model
    if not isinstance(model, FlowVLA):
        raise UserError(f"--velocity {velocity} on a checkpoint needs a model that can carry SAC Flow's {flag}, "
                        f"which {type(model).__name__} cannot; use --velocity plain")
    if getattr(model.cfg, flag):
        return model
    other = [f for f in VELOCITY_FLAGS.values() if f != flag and getattr(model.cfg, f)]
    if other:
        raise UserError(f"--velocity {velocity}: this checkpoint was fine-tuned with a {other[0]}; continue it with "
                        f"the --velocity it was trained with, or start from its SFT checkpoint")
    wrapped = FlowVLA(replace(model.cfg, **{flag: True}), norm)
    missing, unexpected = wrapped.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(f"{flag}.") for k in missing), (missing, unexpected)
    return wrapped


class BackboneFlowActor(nn.Module):
    """The SAC actor interface of flow_velocity.FlowActor (forward, log_prob) on a backbone; `obs` is the flat
    state the backbone reads (state-observation tasks). Evaluation runs the model itself (sim_trainer.evaluate)."""

    def __init__(self, model: FlowPolicy, instruction: str, low: torch.Tensor, high: torch.Tensor, *,
                 num_steps: int, hidden: int = 256, std_min: float = 0.01, std_max: float = 0.1,
                 bc_coef: float = 0.0):
        super().__init__()
        self.model, self.num_steps, self.bc_coef = model, num_steps, bc_coef
        self.horizon, self.action_dim = model.cfg.horizon, model.cfg.action_dim
        self.log_std = mlp(model.pooled_dim + TIME_DIM, hidden, self.horizon * self.action_dim)
        self.log_std_min, self.log_std_max = math.log(std_min), math.log(std_max)
        self.register_buffer("text", model.tokenize([instruction]))
        self.register_buffer("grid", time_grid(num_steps))
        self.register_buffer("action_low", torch.as_tensor(low, dtype=torch.float32))
        self.register_buffer("action_high", torch.as_tensor(high, dtype=torch.float32))
        self.register_buffer("action_mid", (self.action_high + self.action_low) / 2)
        # the frozen start, for the regulariser only (not saved with the actor: it is the --ckpt checkpoint)
        self._start = [copy.deepcopy(model).requires_grad_(False).eval()] if bc_coef > 0 else []

    def actor_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def encode(self, obs: torch.Tensor) -> PrefixCache:
        return self.model.encode_prefix({}, obs, self.text.expand(obs.shape[0], -1))

    def step_stats(self, cache: PrefixCache, x: torch.Tensor, k: int,
                   model: FlowPolicy | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-std of x_{k+1} given x_k."""
        tau = self.grid[k].expand(x.shape[0])
        mean = x - (model or self.model).velocity(cache, x, tau) / self.num_steps
        t = 1.0 - tau  # the std head's time input: 0 at noise, as the from-scratch actor's
        raw = torch.tanh(self.log_std(torch.cat([cache.pooled.detach(), time_embedding(t)], dim=-1)).view_as(x))
        return mean, self.log_std_min + (self.log_std_max - self.log_std_min) * (raw + 1) / 2

    def _denorm_log_det(self) -> torch.Tensor:
        """log |du / dx_K| of the affine de-normalisation u = a + b * x_K for one chunk: H * sum log b, with b read
        off the model's own normaliser (b = std for mean/std, (q99 - q01) / 2 for quantiles, as it defines them)."""
        zero = torch.zeros(1, self.action_dim, device=self.action_low.device)
        scale = self.model.action_norm.inverse(zero + 1.0) - self.model.action_norm.inverse(zero)
        return self.horizon * torch.log(scale.abs()).sum()

    def default_target_entropy(self) -> float:
        """The chain's entropy when every step's noise std sits at the geometric middle of its band: x_0's,
        K Gaussian steps' and the de-normalisation's. (-H * D, the from-scratch default, is far below any entropy
        this chain can have: its x_0 alone carries n / 2 log(2 pi e), so the temperature would grow without end.)"""
        n = self.horizon * self.action_dim
        gauss = 0.5 * math.log(2 * math.pi * math.e)
        log_sigma = (self.log_std_min + self.log_std_max) / 2
        return n * gauss + self.num_steps * n * (log_sigma + gauss) + float(self._denorm_log_det())

    def to_actions(self, x: torch.Tensor) -> torch.Tensor:
        """Executed chunk: the de-normalised x_K clipped into the action bounds."""
        return torch.maximum(torch.minimum(self.model.action_norm.inverse(x), self.action_high), self.action_low)

    def forward(self, obs: torch.Tensor, noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(clipped chunk [B, H, D], chain [B, K+1, H, D], log pi(u) [B]), reparameterised through all K steps."""
        b = obs.shape[0]
        if noise is None:
            noise = torch.randn((b, self.num_steps + 1, self.horizon, self.action_dim), generator=generator)
            noise = noise.to(obs)
        cache = self.encode(obs)
        chain, log_prob = sample_chain(lambda x, k: self.step_stats(cache, x, k), noise, self.num_steps)
        return self.to_actions(chain[:, -1]), chain, log_prob - self._denorm_log_det()

    def log_prob(self, obs: torch.Tensor, chain: torch.Tensor) -> torch.Tensor:
        cache = self.encode(obs)
        return chain_log_density(lambda x, k: self.step_stats(cache, x, k), chain, self.num_steps) - \
            self._denorm_log_det()

    def regulariser(self, obs: torch.Tensor, chain: torch.Tensor) -> torch.Tensor:
        """bc_coef * mean over steps of || mean_k - mean_k(start) ||^2 on the given chain (0 when off)."""
        if not self._start:
            return torch.zeros((), device=obs.device)
        start = self._start[0].to(obs.device)
        cache, start_cache = self.encode(obs), start.encode_prefix({}, obs, self.text.expand(obs.shape[0], -1))
        total = torch.zeros((), device=obs.device)
        for k in range(self.num_steps):
            x = chain[:, k].detach()
            mean = self.step_stats(cache, x, k)[0]
            with torch.no_grad():
                target = self.step_stats(start_cache, x, k, model=start)[0]
            total = total + (mean - target).square().flatten(1).sum(-1).mean()
        return self.bc_coef * total / self.num_steps
