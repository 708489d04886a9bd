"""A flow policy for off-policy RL (SAC Flow): a K-step noise-augmented flow rollout with an exact log-density.

The chain, over an action chunk of H actions of D dimensions (n = H * D numbers), with t_k = k / K and
delta = 1 / K (t = 0 is noise, t = 1 the action):

    x_0 ~ N(0, I),    x_{k+1} = x_k + delta * v(x_k, t_k, o) + sigma_k(o) * eps_k,    eps_k ~ N(0, I),

and the chunk is the last state squashed into the action bounds: a = mid + half * tanh(x_K).

Every x_{k+1} is Gaussian given x_k, so the chain (x_0, ..., x_{K-1}, a) has the exact log-density

    log pi = log N(x_0; 0, I)
           + sum_{k<K} sum_i [ -(x_{k+1,i} - x_{k,i} - delta v_i)^2 / (2 sigma_{k,i}^2)
                               - log sigma_{k,i} - log(2 pi) / 2 ]
           - sum_i log(half_i * (1 - tanh(x_{K,i})^2)).

The -log sigma terms are the change of variables from eps_k to x_{k+1}: dropping them (scoring eps_k under
N(0, I) alone) makes the density parameter-free and the entropy bonus blind to sigma. The last line is the
change of variables of the tanh squash. Bounds are squashed, not clipped: a clipped Gaussian puts point masses
on the bounds, which have no density, so its log-probabilities would be wrong exactly where a policy pushes
against a joint limit.

Three velocity fields, as in SAC Flow:
- plain: v = MLP(o, x_k, t_k). Backpropagating through K Euler steps is a residual RNN; its gradients can
  grow with K.
- flow_g (gated): v = z * (h - x_k), z = sigmoid(gate(o, x_k, t_k)), h = candidate(o, x_k, t_k): a GRU-like
  convex update x_{k+1} = (1 - delta z) x_k + delta z h, so no step amplifies x_k.
- flow_t (decoded): each action of x_k is a token (its values, its position and t_k) passed through pre-norm
  transformer decoder blocks that attend to each other and to observation tokens; a linear head decodes the
  velocity. The normalised residual stream keeps each step's Jacobian well-conditioned.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

VELOCITIES = ("flow_g", "flow_t", "plain")
ACTORS = (*VELOCITIES, "gaussian")  # gaussian: the no-flow SAC baseline (GaussianActor)
BACKBONE_VELOCITIES = ("flow_g", "flow_t", "plain")  # on a pretrained backbone (backbone_actor.py)
TIME_DIM = 16
LOG_2PI = math.log(2 * math.pi)


def time_embedding(t: torch.Tensor, dim: int = TIME_DIM) -> torch.Tensor:
    """Sinusoidal features of the flow time t in [0, 1]: [B] -> [B, dim]."""
    freqs = torch.exp(torch.linspace(0.0, math.log(100.0), dim // 2, dtype=t.dtype, device=t.device))
    angles = t[:, None] * freqs[None] * math.pi
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def mlp(inp: int, hidden: int, out: int, layers: int = 2) -> nn.Sequential:
    mods: list[nn.Module] = []
    for i in range(layers):
        mods += [nn.Linear(inp if i == 0 else hidden, hidden), nn.SiLU()]
    return nn.Sequential(*mods, nn.Linear(hidden, out))


def gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, diag(exp(log_std))^2), summed over every dimension but the batch's."""
    z = (x - mean) * torch.exp(-log_std)
    return (-0.5 * z.square() - log_std - 0.5 * LOG_2PI).flatten(1).sum(-1)


def tanh_log_det(u: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    """log |d a / d u| of a = mid + half * tanh(u), summed per sample. log(1 - tanh(u)^2) is written as
    2 (log 2 - u - softplus(-2u)): exact, and finite where 1 - tanh(u)^2 rounds to 0 (no epsilon added)."""
    return (torch.log(half) + 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))).flatten(1).sum(-1)


StepStats = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]  # (x_k, k) -> mean, log-std of x_{k+1}


def sample_chain(step_stats: StepStats, noise: torch.Tensor, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise-augmented chain x_0..x_K from `noise` [B, K+1, ...] (x_0, then eps_0..eps_{K-1}), reparameterised,
    and the sum of its Gaussian log-densities (x_0's and every step's, -log sigma terms included)."""
    x = noise[:, 0]
    chain = [x]
    log_prob = gaussian_log_density(x, torch.zeros_like(x), torch.zeros_like(x))
    for k in range(num_steps):
        mean, log_std = step_stats(x, k)
        x = mean + torch.exp(log_std) * noise[:, k + 1]
        log_prob = log_prob + gaussian_log_density(x, mean, log_std)
        chain.append(x)
    return torch.stack(chain, dim=1), log_prob


def chain_log_density(step_stats: StepStats, chain: torch.Tensor, num_steps: int) -> torch.Tensor:
    """The same sum for a stored chain [B, K+1, ...], scored anew."""
    x0 = chain[:, 0]
    total = gaussian_log_density(x0, torch.zeros_like(x0), torch.zeros_like(x0))
    for k in range(num_steps):
        mean, log_std = step_stats(chain[:, k], k)
        total = total + gaussian_log_density(chain[:, k + 1], mean, log_std)
    return total


class PlainVelocity(nn.Module):
    def __init__(self, obs_dim: int, horizon: int, action_dim: int, hidden: int):
        super().__init__()
        self.net = mlp(obs_dim + horizon * action_dim + TIME_DIM, hidden, horizon * action_dim)

    def forward(self, obs: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        inp = torch.cat([obs, x.flatten(1), time_embedding(t)], dim=-1)
        return self.net(inp).view_as(x)


class GatedVelocity(nn.Module):
    """Flow-G: v = z * (h - x). The gate's last layer starts at weight 0, bias 5 (z = 0.993 everywhere)."""

    def __init__(self, obs_dim: int, horizon: int, action_dim: int, hidden: int):
        super().__init__()
        n = horizon * action_dim
        self.gate = mlp(obs_dim + n + TIME_DIM, hidden, n)
        self.candidate = mlp(obs_dim + n + TIME_DIM, hidden, n)
        nn.init.zeros_(self.gate[-1].weight)
        nn.init.constant_(self.gate[-1].bias, 5.0)

    def forward(self, obs: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        inp = torch.cat([obs, x.flatten(1), time_embedding(t)], dim=-1)
        z = torch.sigmoid(self.gate(inp))
        return (z * (self.candidate(inp) - x.flatten(1))).view_as(x)


class DecodedVelocity(nn.Module):
    """Flow-T: the H actions of x_k are tokens; pre-norm decoder blocks (self-attention over the chunk,
    cross-attention to `obs_tokens` observation tokens, feed-forward) and a linear velocity head."""

    def __init__(self, obs_dim: int, horizon: int, action_dim: int, hidden: int, d_model: int = 64,
                 heads: int = 4, layers: int = 2, obs_tokens: int = 4):
        super().__init__()
        self.d_model, self.obs_tokens = d_model, obs_tokens
        self.action_in = nn.Linear(action_dim, d_model)
        self.position = nn.Parameter(torch.randn(horizon, d_model) * 0.02)
        self.time_in = mlp(TIME_DIM, hidden, d_model, layers=1)
        self.obs_in = mlp(obs_dim, hidden, obs_tokens * d_model, layers=1)
        block = nn.TransformerDecoderLayer(d_model, heads, 2 * d_model, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerDecoder(block, layers)
        self.out_norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, action_dim)

    def forward(self, obs: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tokens = self.action_in(x) + self.position[None] + self.time_in(time_embedding(t))[:, None]
        memory = self.obs_in(obs).view(obs.shape[0], self.obs_tokens, self.d_model)
        return self.head(self.out_norm(self.blocks(tokens, memory)))


VELOCITY_CLASSES = {"plain": PlainVelocity, "flow_g": GatedVelocity, "flow_t": DecodedVelocity}


class FlowActor(nn.Module):
    """A flow policy over action chunks [H, D] from observation features [F], with per-step noise std
    sigma_k(o) in [std_min, std_max] (log-std through a tanh, as a function of the observation and t_k)."""

    def __init__(self, obs_dim: int, horizon: int, action_dim: int, low: torch.Tensor, high: torch.Tensor, *,
                 velocity: str = "flow_g", num_steps: int = 4, hidden: int = 256, std_min: float = 0.01,
                 std_max: float = 1.0):
        super().__init__()
        if velocity not in VELOCITIES:
            raise ValueError(f"unknown velocity {velocity!r}; choose one of {', '.join(VELOCITIES)}")
        self.horizon, self.action_dim, self.num_steps = horizon, action_dim, num_steps
        self.velocity = VELOCITY_CLASSES[velocity](obs_dim, horizon, action_dim, hidden)
        self.log_std = mlp(obs_dim + TIME_DIM, hidden, horizon * action_dim)
        self.log_std_min, self.log_std_max = math.log(std_min), math.log(std_max)
        low, high = torch.as_tensor(low, dtype=torch.float32), torch.as_tensor(high, dtype=torch.float32)
        self.register_buffer("action_mid", (high + low) / 2)
        self.register_buffer("action_half", (high - low) / 2)

    def step_stats(self, obs: torch.Tensor, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-std of x_{k+1} given x_k: x_k + delta * v(x_k, t_k, o) and log sigma_k(o)."""
        t = torch.full((obs.shape[0],), k / self.num_steps, dtype=obs.dtype, device=obs.device)
        mean = x + self.velocity(obs, x, t) / self.num_steps
        raw = torch.tanh(self.log_std(torch.cat([obs, time_embedding(t)], dim=-1)).view_as(x))
        log_std = self.log_std_min + (self.log_std_max - self.log_std_min) * (raw + 1) / 2
        return mean, log_std

    def squash(self, u: torch.Tensor) -> torch.Tensor:
        return self.action_mid + self.action_half * torch.tanh(u)

    def forward(self, obs: torch.Tensor, noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample (action chunk [B, H, D], chain [B, K+1, H, D] of x_0..x_K, log pi [B]), differentiable in the
        parameters (reparameterised). `noise` [B, K+1, H, D] holds x_0 and eps_0..eps_{K-1}; drawn if None."""
        b = obs.shape[0]
        if noise is None:
            shape = (b, self.num_steps + 1, self.horizon, self.action_dim)
            where = generator.device if generator is not None else obs.device
            noise = torch.randn(shape, generator=generator, dtype=obs.dtype, device=where).to(obs.device)
        chain, log_prob = sample_chain(lambda x, k: self.step_stats(obs, x, k), noise, self.num_steps)
        u = chain[:, -1]
        return self.squash(u), chain, log_prob - tanh_log_det(u, self.action_half.expand_as(u))

    def log_prob(self, obs: torch.Tensor, chain: torch.Tensor) -> torch.Tensor:
        """log pi of a given chain [B, K+1, H, D] (x_0..x_K, x_K before the squash): the same sum, scored anew."""
        total = chain_log_density(lambda x, k: self.step_stats(obs, x, k), chain, self.num_steps)
        u = chain[:, -1]
        return total - tanh_log_det(u, self.action_half.expand_as(u))

    @torch.no_grad()
    def act_deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        """Evaluation: x_0 = 0 and no step noise (the chain's mean path), squashed."""
        x = torch.zeros((obs.shape[0], self.horizon, self.action_dim), dtype=obs.dtype, device=obs.device)
        for k in range(self.num_steps):
            x = self.step_stats(obs, x, k)[0]
        return self.squash(x)


class GaussianActor(nn.Module):
    """The SAC baseline on the same code (`--velocity gaussian`): no flow, one tanh-squashed Gaussian per chunk,
    a = squash(mu(o) + sigma(o) * eps), log pi = log N(u; mu, sigma^2) - the squash's log-det. Its `chain` is
    [B, 1, H, D] (u alone) and num_steps is 0, so SAC and the tests treat it like a flow actor."""

    num_steps = 0

    def __init__(self, obs_dim: int, horizon: int, action_dim: int, low: torch.Tensor, high: torch.Tensor, *,
                 hidden: int = 256, std_min: float = 0.01, std_max: float = 1.0):
        super().__init__()
        self.horizon, self.action_dim = horizon, action_dim
        self.net = mlp(obs_dim, hidden, 2 * horizon * action_dim)
        self.log_std_min, self.log_std_max = math.log(std_min), math.log(std_max)
        low, high = torch.as_tensor(low, dtype=torch.float32), torch.as_tensor(high, dtype=torch.float32)
        self.register_buffer("action_mid", (high + low) / 2)
        self.register_buffer("action_half", (high - low) / 2)

    def stats(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, raw = self.net(obs).view(obs.shape[0], 2, self.horizon, self.action_dim).unbind(1)
        return mean, self.log_std_min + (self.log_std_max - self.log_std_min) * (torch.tanh(raw) + 1) / 2

    def forward(self, obs: torch.Tensor, noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, log_std = self.stats(obs)
        if noise is None:
            where = generator.device if generator is not None else obs.device
            noise = torch.randn((obs.shape[0], 1, *mean.shape[1:]), generator=generator, dtype=obs.dtype,
                                device=where).to(obs.device)
        u = mean + torch.exp(log_std) * noise[:, 0]
        log_prob = gaussian_log_density(u, mean, log_std) - tanh_log_det(u, self.action_half.expand_as(u))
        return self.action_mid + self.action_half * torch.tanh(u), u[:, None], log_prob

    @torch.no_grad()
    def act_deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        return self.action_mid + self.action_half * torch.tanh(self.stats(obs)[0])
