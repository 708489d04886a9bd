"""A pi0-shaped flow-matching VLA, small enough to train on a CPU.

Prefix (once per observation): a CNN per camera turns each image into a grid of tokens, the
instruction is byte-tokenised and embedded, the normalised proprio state is one token; a transformer
encoder mixes them. Each action-expert layer's cross-attention keys/values over the prefix are computed
once and cached (the analogue of pi0's VLM KV cache).

Action expert (K times per chunk): a transformer over the H noisy action tokens plus a flow-time
embedding, attending to the cached prefix; it returns the velocity v(x_tau, tau) and its per-token
features (hooks for RL noise and value heads). A shortcut model (cfg.shortcut) also embeds the step size d
(see flow.py); a plain model has no such weights and ignores d. A gated model (cfg.velocity_gate, made by SAC Flow
from a checkpoint) scales each velocity number by z = 2 sigmoid(gate(features)) in (0, 2); a decoded one
(cfg.velocity_decoder, SAC Flow's Flow-T) adds a decoder block's output to it. All model inputs and
outputs are normalised; the Normalizer buffers convert raw state and actions at the boundary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from sim_trainer.data.normalize import Normalizer, NormStats
from sim_trainer.models.config import ModelConfig
from sim_trainer.models.flow import (
    FINEST_STEP,
    SHORTCUT_LEVELS,
    euler_denoise,
    interpolate,
    masked_mse,
    sample_consistency_steps,
    sample_tau,
    self_consistency_target,
)
from sim_trainer.models.interface import PrefixCache
from sim_trainer.models.tokenizer import PAD, VOCAB_SIZE, tokenize_batch

NEG_INF = -1e9  # finite mask value: no NaN for fully masked rows, and exports cleanly


class Attention(nn.Module):
    """Multi-head attention written out as matmul + softmax (exportable, no fused kernels)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.h, self.dh).transpose(1, 2)

    def keys_values(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split(self.k(src)), self.split(self.v(src))

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None):
        q = self.split(self.q(x))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.dh)
        if key_mask is not None:
            att = att.masked_fill(~key_mask[:, None, None, :], NEG_INF)
        out = att.softmax(-1) @ v
        b, _, n, _ = out.shape
        return self.o(out.transpose(1, 2).reshape(b, n, self.h * self.dh))


def mlp(d: int, ratio: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, ratio * d), nn.GELU(), nn.Linear(ratio * d, d))


class EncoderBlock(nn.Module):
    def __init__(self, d: int, heads: int, ratio: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn, self.mlp = Attention(d, heads), mlp(d, ratio)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, *self.attn.keys_values(h), key_mask=mask)
        return x + self.mlp(self.ln2(x))


class ExpertBlock(nn.Module):
    def __init__(self, d: int, heads: int, ratio: int):
        super().__init__()
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn, self.cross_attn, self.mlp = Attention(d, heads), Attention(d, heads), mlp(d, ratio)

    def forward(self, x, prefix_k, prefix_v, prefix_mask):
        h = self.ln1(x)
        x = x + self.self_attn(h, *self.self_attn.keys_values(h))
        x = x + self.cross_attn(self.ln2(x), prefix_k, prefix_v, key_mask=prefix_mask)
        return x + self.mlp(self.ln3(x))


class VelocityDecoder(nn.Module):
    """SAC Flow's Flow-T on a trained expert: one decoder block over the action tokens' features (self-attention
    across the chunk, cross-attention to the pooled prefix, the observation's embedding) whose output is added to
    the velocity. Its output layer starts at zero, so a model with a fresh decoder is the model without one."""

    def __init__(self, d: int, heads: int, ratio: int, action_dim: int):
        super().__init__()
        self.block, self.ln, self.out = ExpertBlock(d, heads, ratio), nn.LayerNorm(d), nn.Linear(d, action_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, feats: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        memory = pooled[:, None, :]
        k, v = self.block.cross_attn.keys_values(memory)
        mask = torch.ones(memory.shape[:2], dtype=torch.bool, device=memory.device)
        return self.out(self.ln(self.block(feats, k, v, mask)))


class VisionEncoder(nn.Module):
    """Strided CNN, then average-pooled to a grid x grid map: one token per cell, learned 2-D positions."""

    def __init__(self, channels: tuple[int, ...], d: int, image_size: int, grid: int):
        super().__init__()
        layers, c_in, size = [], 3, image_size
        for c in channels:
            stride = 2 if size > 2 * grid else 1
            layers += [nn.Conv2d(c_in, c, 3, stride=stride, padding=1), nn.GroupNorm(min(8, c), c), nn.GELU()]
            c_in, size = c, (size + stride - 1) // stride
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(grid))
        self.proj = nn.Linear(c_in, d)
        self.pos = nn.Parameter(torch.randn(grid * grid, d) * 0.02)

    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        x = images_uint8.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # [-1, 1] as openpi
        f = self.net(x).flatten(2).transpose(1, 2)  # [B, grid * grid, C]
        return self.proj(f) + self.pos


def sinusoidal(tau: torch.Tensor, dim: int) -> torch.Tensor:
    """Sine-cosine embedding of flow time (periods from 4e-3 to 4, as pi0), [B] -> [B, dim]."""
    half = dim // 2
    freqs = 1.0 / (4e-3 * (4.0 / 4e-3) ** (torch.arange(half, dtype=torch.float32, device=tau.device) / (half - 1)))
    ang = tau[:, None] * freqs[None, :] * 2 * math.pi
    return torch.cat([ang.sin(), ang.cos()], dim=-1)


# Parameter groups (models/interface.py) by module name: the CNNs are the vision encoder; text, state and the
# prefix transformer stand in for the language model; the rest is the action expert.
GROUP_PREFIXES = {"vision": ("cameras.",),
                  "language": ("text_embed.", "text_pos", "text_patch.", "state_proj.", "type_embed", "encoder.",
                               "prefix_ln.")}


class FlowVLA(nn.Module):
    """Implements models.interface.FlowPolicy."""

    def __init__(self, cfg: ModelConfig, norm: NormStats):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.feature_dim = self.pooled_dim = d
        self.state_norm, self.action_norm = Normalizer(norm.state), Normalizer(norm.actions)
        self.cameras = nn.ModuleDict(
            {c: VisionEncoder(cfg.cnn_channels, d, cfg.image_size, cfg.image_grid) for c in cfg.camera_names})
        self.text_embed = nn.Embedding(VOCAB_SIZE, d, padding_idx=PAD)
        self.text_pos = nn.Parameter(torch.randn(cfg.max_text_len, d) * 0.02)
        # Byte tokens are many; a strided projection groups text_patch bytes into one prefix token.
        self.text_patch = nn.Conv1d(d, d, cfg.text_patch, stride=cfg.text_patch)
        self.state_proj = nn.Linear(cfg.state_dim, d)
        self.type_embed = nn.Parameter(torch.randn(3, d) * 0.02)  # image / text / state token types
        self.encoder = nn.ModuleList(EncoderBlock(d, cfg.n_heads, cfg.mlp_ratio) for _ in range(cfg.prefix_layers))
        self.prefix_ln = nn.LayerNorm(d)

        self.action_in = nn.Linear(cfg.action_dim, d)
        self.time_mlp = nn.Sequential(nn.Linear(2 * d, d), nn.SiLU(), nn.Linear(d, d))
        self.action_pos = nn.Parameter(torch.randn(cfg.horizon, d) * 0.02)
        if cfg.shortcut:  # step-size embedding, added to every action token like the time embedding
            self.step_mlp = nn.Sequential(nn.Linear(1, d), nn.SiLU(), nn.Linear(d, d))
        self.expert = nn.ModuleList(ExpertBlock(d, cfg.n_heads, cfg.mlp_ratio) for _ in range(cfg.expert_layers))
        self.expert_ln = nn.LayerNorm(d)
        self.action_out = nn.Linear(d, cfg.action_dim)
        if cfg.velocity_gate:  # z = 2 sigmoid(0) = 1 at the start: the gated model is the ungated one
            self.velocity_gate = nn.Linear(d, cfg.action_dim)
            nn.init.zeros_(self.velocity_gate.weight)
            nn.init.zeros_(self.velocity_gate.bias)
        if cfg.velocity_decoder:
            self.velocity_decoder = VelocityDecoder(d, cfg.n_heads, cfg.mlp_ratio, cfg.action_dim)

    # ----- prefix -------------------------------------------------------------------------------
    def tokenize(self, instructions: Sequence[str]) -> torch.Tensor:
        """[B, max_text_len] byte tokens, the contract's tokenizer (the robot side computes the same ids)."""
        return tokenize_batch(list(instructions), self.cfg.max_text_len)

    def encode_prefix(self, images: dict[str, torch.Tensor], state: torch.Tensor, text: torch.Tensor) -> PrefixCache:
        """images: uint8 [B, H, W, 3] per camera; state: raw [B, S]; text: token ids [B, L]."""
        b = state.shape[0]
        tokens, masks = [], []
        for name, enc in self.cameras.items():
            t = enc(images[name]) + self.type_embed[0]
            tokens.append(t)
            masks.append(torch.ones(b, t.shape[1], dtype=torch.bool, device=state.device))
        t = self.text_embed(text) + self.text_pos[: text.shape[1]]
        tokens.append(self.text_patch(t.transpose(1, 2)).transpose(1, 2) + self.type_embed[1])
        masks.append((text != PAD).view(b, -1, self.cfg.text_patch).any(-1))
        tokens.append(self.state_proj(self.state_norm(state)).unsqueeze(1) + self.type_embed[2])
        masks.append(torch.ones(b, 1, dtype=torch.bool, device=state.device))
        x, mask = torch.cat(tokens, 1), torch.cat(masks, 1)
        for block in self.encoder:
            x = block(x, mask)
        x = self.prefix_ln(x)
        m = mask.unsqueeze(-1).float()
        pooled = (x * m).sum(1) / m.sum(1)
        kv = [blk.cross_attn.keys_values(x) for blk in self.expert]
        return PrefixCache(kv=kv, mask=mask, pooled=pooled)

    # ----- action expert ------------------------------------------------------------------------
    def expert_forward(
        self, cache: PrefixCache, x: torch.Tensor, tau: torch.Tensor, step: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Velocity v(x_tau, tau[, d]) [B, H, A] and per-action-token features [B, H, d_model].

        x: normalised noisy chunk [B, H, A]; tau: [B] flow time (1 = noise); step: [B] step size d, required by
        a shortcut model and ignored by a plain one.
        """
        a = self.action_in(x)
        t = sinusoidal(tau, self.cfg.d_model)[:, None, :].expand_as(a)
        h = self.time_mlp(torch.cat([a, t], -1)) + self.action_pos[: x.shape[1]]
        if self.cfg.shortcut:
            if step is None:
                raise ValueError("a shortcut model needs the step size d")
            # log-scale, so the trained powers of two 1..1/128 are evenly spaced in [0, 1]; a smooth MLP of it
            # (no high-frequency sinusoid) interpolates between them, e.g. d = 1/10 for K = 10
            level = -torch.log2(step) / SHORTCUT_LEVELS
            h = h + self.step_mlp(level[:, None])[:, None, :]
        for blk, (k, v) in zip(self.expert, cache.kv, strict=True):
            h = blk(h, k, v, cache.mask)
        feats = self.expert_ln(h)
        v = self.action_out(feats)
        if self.cfg.velocity_gate:
            v = 2.0 * torch.sigmoid(self.velocity_gate(feats)) * v
        if self.cfg.velocity_decoder:
            v = v + self.velocity_decoder(feats, cache.pooled)
        return v, feats

    def velocity(self, cache: PrefixCache, x: torch.Tensor, tau: torch.Tensor,
                 step: torch.Tensor | None = None) -> torch.Tensor:
        return self.expert_forward(cache, x, tau, step)[0]

    # ----- training -----------------------------------------------------------------------------
    def flow_matching_loss(self, images, state, text, actions, valid: torch.Tensor | None = None,
                           noise: torch.Tensor | None = None, tau: torch.Tensor | None = None,
                           generator: torch.Generator | None = None) -> torch.Tensor:
        """E || v(x_tau, tau) - (eps - A) ||^2 over valid chunk steps (padding past an episode's end excluded);
        a shortcut model's v is taken at the finest step size d."""
        a = self.action_norm(actions)
        if noise is None:
            noise = torch.randn(a.shape, generator=generator).to(a)
        if tau is None:
            tau = sample_tau(a.shape[0], generator).to(a)
        x_tau, target = interpolate(a, noise, tau)
        v = self.velocity(self.encode_prefix(images, state, text), x_tau, tau, torch.full_like(tau, FINEST_STEP))
        return masked_mse(v, target, valid)

    def shortcut_loss(self, images, state, text, actions, valid: torch.Tensor | None = None,
                      consistency_fraction: float = 0.25, generator: torch.Generator | None = None) -> torch.Tensor:
        """The shortcut objective: flow matching at the finest step d on most of the batch; on its first
        `consistency_fraction`, one 2d-step regresses onto two d-steps of the current model (no gradient)."""
        if not self.cfg.shortcut:
            raise ValueError("the shortcut objective needs a model built with shortcut=True")
        a = self.action_norm(actions)
        b, n = a.shape[0], int(a.shape[0] * consistency_fraction)
        noise = torch.randn(a.shape, generator=generator).to(a)
        tau = sample_tau(b, generator).to(a)
        tau_sc, d = (t.to(a) for t in sample_consistency_steps(n, generator))
        tau = torch.cat([tau_sc, tau[n:]])
        step = torch.cat([2 * d, torch.full_like(tau[n:], FINEST_STEP)])
        x_tau, target = interpolate(a, noise, tau)
        cache = self.encode_prefix(images, state, text)
        if n:
            with torch.no_grad():
                part = cache.first(n)
                target_sc = self_consistency_target(lambda x, t, s: self.velocity(part, x, t, s), x_tau[:n],
                                                    tau_sc, d)
            target = torch.cat([target_sc, target[n:]])
        return masked_mse(self.velocity(cache, x_tau, tau, step), target, valid)

    # ----- sampling -----------------------------------------------------------------------------
    def denoise(self, cache: PrefixCache, noise: torch.Tensor, num_steps: int) -> torch.Tensor:
        """K Euler steps from x_0 = noise (tau = 1) to a normalised action chunk (tau = 0); a shortcut model
        is told the step size d = 1/K (a constant in an exported graph)."""
        return euler_denoise(lambda x, tau, d: self.velocity(cache, x, tau, d), noise, num_steps)

    def sample_actions(self, images, state, text, noise: torch.Tensor, num_steps: int | None = None) -> torch.Tensor:
        """Raw (unnormalised) action chunk [B, H, A]; the noise is an explicit input (deterministic, exportable)."""
        cache = self.encode_prefix(images, state, text)
        return self.action_norm.inverse(self.denoise(cache, noise, num_steps or self.cfg.num_steps))

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        groups: dict[str, list[nn.Parameter]] = {"vision": [], "language": [], "expert": []}
        for name, p in self.named_parameters():
            group = next((g for g, prefixes in GROUP_PREFIXES.items() if name.startswith(prefixes)), "expert")
            groups[group].append(p)
        return groups

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
