"""SmolVLA (LeRobot's `smolvla` policy) in PyTorch, built from transformers' SmolVLM and Llama building blocks.

Prefix (once per observation): each camera image is resized with padding to the backbone's size, encoded by the
SmolVLM vision transformer and its pixel-shuffle connector; the instruction is embedded by the language model's
table (both scaled by sqrt(width)); the normalised, zero-padded state is one more token (state_proj). The first
`num_vlm_layers` language-model layers run over the prefix, which is bidirectional among images and text and hidden
from them for the state token. Each layer's keys (after RoPE) and values are kept: that is the KV cache.

Action expert (K times per chunk): a narrower Llama stack (width x expert_width_multiplier) over the H noisy
action tokens, each fused with a sinusoidal flow-time embedding by an MLP. Its layers alternate (every
`self_attn_every_n_layers`): self-attention layers attend to [cached prefix keys/values; the causal action tokens]
at positions after the prefix; cross-attention layers attend to the cached prefix keys/values re-projected by the
expert's own k/v projections, with the action queries at positions from 0. The cache is only read, never grown
or trimmed, so any number of velocity evaluations (sampling, RL log-probs) can share it.

Flow convention (openpi's, as LeRobot's): x_tau = tau * noise + (1 - tau) * actions, target noise - actions,
Euler from tau = 1 to 0. Actions and state are zero-padded to max_action_dim / max_state_dim inside the model;
x may carry all max_action_dim dims (as LeRobot samples: its padded dims hold noise too) or only the robot's
action_dim (then the padded dims are zero). Normalisation is LeRobot's MEAN_STD, from the checkpoint's stats.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils.checkpoint import checkpoint

from sim_trainer.errors import UserError
from sim_trainer.models.flow import euler_denoise, interpolate, sample_tau
from sim_trainer.models.interface import PrefixCache
from sim_trainer.models.vla.loader import read_json, read_weights
from sim_trainer.models.vla.smolvla_io import (
    ACTION_KEY,
    STATE_KEY,
    MeanStdNormalizer,
    SmolVLATokenizer,
    check_state_dict,
    read_mean_std,
    resolve_backbone,
)

ROPE_WAVELENGTH = 10_000  # SmolVLA's own RoPE, not the backbone's rope_theta
IMAGE_PREFIX = "observation.images."
DEFAULT_BACKBONE = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"


@dataclass
class SmolVLAConfig:
    """What the pipeline reads (horizon .. max_text_len, as every backbone) and SmolVLA's own layout."""

    horizon: int  # H: LeRobot's chunk_size
    action_dim: int  # the robot's action dims (output_features.action)
    state_dim: int
    num_steps: int  # K: default denoising steps
    exec_steps: int  # LeRobot's n_action_steps
    camera_names: tuple[str, ...]  # LeRobot's image feature keys without "observation.images."
    image_size: int  # the vision encoder's square input
    max_text_len: int  # tokenizer_max_length
    max_state_dim: int = 32
    max_action_dim: int = 32
    resize: tuple[int, int] | None = (512, 512)  # (width, height) of resize-with-padding, None: images as given
    empty_cameras: int = 0  # masked camera slots appended after the real cameras
    num_vlm_layers: int = 16
    num_expert_layers: int = 16
    self_attn_every_n_layers: int = 2
    cross_attention: bool = True  # LeRobot's attention_mode "cross_attn" (else "self_attn": every layer joint)
    expert_width_multiplier: float = 0.75
    min_period: float = 4e-3
    max_period: float = 4.0
    vlm_model_name: str = DEFAULT_BACKBONE

    def is_cross(self, layer: int) -> bool:
        """Whether layer `layer` (of the VLM for attention, of the expert for k/v shapes) is cross-attention."""
        n = self.self_attn_every_n_layers
        return self.cross_attention and not (n > 0 and layer % n == 0)


def get_intermediate_size(width: int, multiplier: int = 4, multiple_of: int = 256) -> int:
    """The expert's MLP width: 2/3 * 4 * width rounded up to a multiple of 256 (as SmolVLA sizes it)."""
    hidden = int(multiplier * int(2 * width / 3))
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def resize_with_pad(images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[B, 3, h, w] in [0, 1] -> [B, 3, height, width]: bilinear resize keeping the aspect ratio, black padding on
    the left and top (LeRobot's SmolVLA preprocessing)."""
    cur_h, cur_w = images.shape[2:]
    ratio = max(cur_w / width, cur_h / height)
    new_h, new_w = int(cur_h / ratio), int(cur_w / ratio)
    out = F.interpolate(images, size=(new_h, new_w), mode="bilinear", align_corners=False)
    return F.pad(out, (max(0, width - new_w), 0, max(0, height - new_h), 0), value=0.0)


def rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Half-split rotary embedding of x [B, T, heads, D] at integer positions [B, T], computed in float32."""
    half = x.shape[-1] // 2
    exponents = (2.0 / x.shape[-1]) * torch.arange(half, dtype=torch.float32, device=x.device)
    radians = (positions[..., None].float() / ROPE_WAVELENGTH ** exponents)[..., None, :]
    sin, cos = radians.sin(), radians.cos()
    x1, x2 = x.float().split(half, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Grouped-query attention in float32: q [B, Tq, heads, D], k/v [B, Tk, kv_heads, D], mask bool [B, Tq, Tk]
    (True: may attend) -> [B, Tq, heads * D]. A fully masked row (padding) gets uniform weights, never NaN: also
    under bf16 autocast, which is kept out of the scores (its bf16 would turn the mask value into -inf)."""
    b, tq, heads, d = q.shape
    groups = heads // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    with torch.autocast(q.device.type, enabled=False):
        scores = torch.matmul(q.float().transpose(1, 2), k.float().permute(0, 2, 3, 1)) * d ** -0.5
        probs = torch.where(mask[:, None], scores, torch.finfo(torch.float32).min).softmax(-1)
    out = torch.matmul(probs.to(v.dtype), v.transpose(1, 2))
    return out.transpose(1, 2).reshape(b, tq, heads * d)


def time_embedding(tau: torch.Tensor, dim: int, min_period: float, max_period: float) -> torch.Tensor:
    """Sine-cosine embedding of flow time [B] -> [B, dim], in float64 (high frequencies need it for 1e-4)."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=tau.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = (1.0 / period * 2 * math.pi)[None, :] * tau.double()[:, None]
    return torch.cat([angle.sin(), angle.cos()], dim=1)


def vision_positions(rows: int, cols: int, per_side: int, device: torch.device) -> torch.Tensor:
    """Position-table index of each patch of a rows x cols grid, as transformers 4.x's SmolVLM vision embeddings
    compute it (fractional coordinates i / rows * (1 - 1e-6) bucketed by multiples of 1 / per_side), which every
    published SmolVLA checkpoint was trained with. Those coordinates fall just below the bucket edges, so the first
    two rows (and columns) share an index; transformers >= 5 buckets without that shift, so its module's own
    embedding forward would not reproduce these models."""
    boundaries = torch.arange(1 / per_side, 1.0, 1 / per_side, device=device)
    h = torch.arange(rows, dtype=torch.float32, device=device) / rows * (1 - 1e-6)
    w = torch.arange(cols, dtype=torch.float32, device=device) / cols * (1 - 1e-6)
    bh, bw = torch.bucketize(h, boundaries, right=True), torch.bucketize(w, boundaries, right=True)
    return (bh[:, None] * per_side + bw[None, :]).flatten()


def pad_last(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Zero-pad the last axis to `dim` (state and actions to the backbone's max dims)."""
    return x if x.shape[-1] == dim else F.pad(x, (0, dim - x.shape[-1]))


def finish_layer(layer: nn.Module, h: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
    """The rest of a pre-norm Llama layer after attention: output projection, residual, norm, MLP, residual."""
    h = h + layer.self_attn.o_proj(att.to(layer.self_attn.o_proj.weight.dtype))
    return h + layer.mlp(layer.post_attention_layernorm(h))


class SmolVLAPolicy(nn.Module):
    """The policy interface of flow_vla.FlowVLA (encode_prefix, expert_forward, denoise, ...) for SmolVLA."""

    def __init__(self, cfg: SmolVLAConfig, vlm_config, state_norm: MeanStdNormalizer,
                 action_norm: MeanStdNormalizer, tokenizer: SmolVLATokenizer | None = None):
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm
        from transformers.models.smolvlm.modeling_smolvlm import SmolVLMConnector, SmolVLMVisionTransformer

        super().__init__()
        self.cfg, self.tokenizer, self.gradient_checkpointing = cfg, tokenizer, False
        self.vlm_config = vlm_config  # saved with a checkpoint of this model (models/backbones.py)
        self.state_norm, self.action_norm = state_norm, action_norm
        text = vlm_config.text_config
        vision_config = copy.deepcopy(vlm_config.vision_config)
        vision_config._attn_implementation = "eager"  # plain matmul + softmax: exportable, no fused kernels
        self.vision = SmolVLMVisionTransformer(vision_config)
        self.connector = SmolVLMConnector(vlm_config)
        pad = text.pad_token_id if isinstance(text.pad_token_id, int) and 0 <= text.pad_token_id < text.vocab_size \
            else None
        self.embed_tokens = nn.Embedding(text.vocab_size, text.hidden_size, pad)
        self.vlm_layers = nn.ModuleList(LlamaDecoderLayer(text, i) for i in range(cfg.num_vlm_layers))
        self.vlm_norm = LlamaRMSNorm(text.hidden_size, eps=text.rms_norm_eps)

        expert = copy.deepcopy(text)
        expert.hidden_size = int(text.hidden_size * cfg.expert_width_multiplier)
        expert.intermediate_size = get_intermediate_size(expert.hidden_size)
        expert.num_hidden_layers = cfg.num_expert_layers
        self.expert_layers = nn.ModuleList(LlamaDecoderLayer(expert, j) for j in range(cfg.num_expert_layers))
        kv_width = text.num_key_value_heads * text.head_dim
        for j, layer in enumerate(self.expert_layers):
            if cfg.is_cross(j):  # keys/values come from the VLM's cached ones, not from the expert's tokens
                layer.self_attn.k_proj = nn.Linear(kv_width, kv_width, bias=text.attention_bias)
                layer.self_attn.v_proj = nn.Linear(kv_width, kv_width, bias=text.attention_bias)
        self.expert_norm = LlamaRMSNorm(expert.hidden_size, eps=text.rms_norm_eps)

        width, self.feature_dim, self.pooled_dim = expert.hidden_size, expert.hidden_size, text.hidden_size
        self.head_dim = text.head_dim
        self.state_proj = nn.Linear(cfg.max_state_dim, text.hidden_size)
        self.action_in_proj = nn.Linear(cfg.max_action_dim, width)
        self.action_out_proj = nn.Linear(width, cfg.max_action_dim)
        self.action_time_mlp_in = nn.Linear(2 * width, width)
        self.action_time_mlp_out = nn.Linear(width, width)
        every = cfg.num_vlm_layers // cfg.num_expert_layers
        # VLM layer i is paired with expert layer i / every when `every` divides i, else the expert skips it
        self.expert_of = [i // every if i % every == 0 else None for i in range(cfg.num_vlm_layers)]
        self.pad_id = tokenizer.pad_id if tokenizer is not None else (pad if pad is not None else 0)

    # ----- interface helpers --------------------------------------------------------------------------------
    def tokenize(self, instructions: list[str], state: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids [B, max_text_len] of the backbone's tokenizer (SmolVLA's prompt does not hold the state)."""
        if self.tokenizer is None:
            raise UserError("this SmolVLA model was built without a tokenizer")
        return self.tokenizer(instructions)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """vision: encoder + connector; language: embedding + VLM layers; expert: the action expert and its time
        MLP; heads: the projections from the robot's state/action spaces and back."""
        groups = {"vision": (self.vision, self.connector),
                  "language": (self.embed_tokens, self.vlm_layers, self.vlm_norm),
                  "expert": (self.expert_layers, self.expert_norm, self.action_time_mlp_in, self.action_time_mlp_out),
                  "heads": (self.state_proj, self.action_in_proj, self.action_out_proj)}
        return {name: [p for m in mods for p in m.parameters()] for name, mods in groups.items()}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _run(self, fn, *args):
        """fn(*args), recomputed in backward instead of stored when gradient checkpointing is on."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    # ----- prefix -------------------------------------------------------------------------------------------
    def _pixels(self, images_uint8: torch.Tensor) -> torch.Tensor:
        x = images_uint8.permute(0, 3, 1, 2).float() / 255.0
        if self.cfg.resize is not None:
            x = resize_with_pad(x, *self.cfg.resize)
        return x * 2.0 - 1.0

    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """The vision transformer's patch tokens [B, N, Wv] of images [B, 3, h, w] in [-1, 1]."""
        emb = self.vision.embeddings
        x = emb.patch_embedding(pixels.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        rows, cols = pixels.shape[2] // emb.patch_size, pixels.shape[3] // emb.patch_size
        x = x + emb.position_embedding(vision_positions(rows, cols, emb.num_patches_per_side, x.device))
        return self.vision.post_layernorm(self.vision.encoder(inputs_embeds=x).last_hidden_state)

    def _embed_prefix(self, images: dict[str, torch.Tensor], state: torch.Tensor, text: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token embeddings [B, P, W], validity [B, P] and block flags [P] (1 starts a block later tokens see).

        A camera missing from `images` is left out: masked tokens are invisible and take no position, so leaving
        them out changes no output. With no camera at all (a model fitted to state-only data) the prefix is the
        text and the state."""
        present = [c for c in self.cfg.camera_names if c in images]
        b, device = state.shape[0], state.device
        embs, valid = [], []
        for name in present:
            e = self.connector(self._encode_image(self._pixels(images[name])))
            embs.append(e * torch.tensor(e.shape[-1] ** 0.5, dtype=e.dtype, device=e.device))
            valid.append(torch.ones(b, e.shape[1], dtype=torch.bool, device=device))
        for _ in range(self.cfg.empty_cameras if present else 0):  # masked slots, kept as LeRobot lays them out
            embs.append(torch.zeros_like(embs[0]))
            valid.append(torch.zeros_like(valid[0]))
        lang = self.embed_tokens(text)
        embs.append(lang * math.sqrt(lang.shape[-1]))
        valid.append(text != self.pad_id)
        s = pad_last(self.state_norm(state), self.cfg.max_state_dim)
        s = self.state_proj(s.to(self.state_proj.weight.dtype))
        embs.append(s[:, None, :])
        valid.append(torch.ones(b, 1, dtype=torch.bool, device=device))
        x, mask = torch.cat(embs, 1), torch.cat(valid, 1)
        flags = torch.zeros(x.shape[1], dtype=torch.long, device=device)
        flags[-1] = 1  # the state token: images and text cannot see it
        return x, mask, flags

    def _vlm_layer(self, i: int, h: torch.Tensor, pos: torch.Tensor, mask2d: torch.Tensor):
        layer = self.vlm_layers[i]
        x = layer.input_layernorm(h).to(layer.self_attn.q_proj.weight.dtype)
        shape = (*x.shape[:-1], -1, self.head_dim)
        q = rope(layer.self_attn.q_proj(x).view(shape), pos)
        k = rope(layer.self_attn.k_proj(x).view(shape), pos)
        v = layer.self_attn.v_proj(x).view(shape)
        return finish_layer(layer, h, attention(q, k, v, mask2d)), k, v

    def encode_prefix(self, images: dict[str, torch.Tensor], state: torch.Tensor, text: torch.Tensor
                      ) -> PrefixCache:
        """images: uint8 [B, H, W, 3] per camera name; state: raw [B, state_dim]; text: token ids [B, L]."""
        h, mask, flags = self._embed_prefix(images, state, text)
        blocks = flags.cumsum(0)
        mask2d = (blocks[None, :] <= blocks[:, None])[None] & mask[:, None, :] & mask[:, :, None]
        pos = mask.long().cumsum(-1) - 1  # padding and masked cameras do not advance the position
        kv = []
        for i in range(len(self.vlm_layers)):
            h, k, v = self._run(self._vlm_layer, i, h, pos, mask2d)
            kv.append((k, v))
        w = mask[..., None].to(h.dtype)
        pooled = (self.vlm_norm(h) * w).sum(1) / w.sum(1)
        return PrefixCache(kv=kv, mask=mask, pooled=pooled)

    # ----- action expert ------------------------------------------------------------------------------------
    def _embed_suffix(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        a = self.action_in_proj(x.to(self.action_in_proj.weight.dtype))
        t = time_embedding(tau, a.shape[-1], self.cfg.min_period, self.cfg.max_period).to(a.dtype)
        h = self.action_time_mlp_in(torch.cat([a, t[:, None, :].expand_as(a)], dim=-1))
        return self.action_time_mlp_out(F.silu(h))

    def _expert_layer(self, i: int, h: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], pos_self: torch.Tensor,
                      mask_self: torch.Tensor, mask_cross: torch.Tensor) -> torch.Tensor:
        layer = self.expert_layers[self.expert_of[i]]
        attn = layer.self_attn
        x = layer.input_layernorm(h).to(attn.q_proj.weight.dtype)
        shape = (*x.shape[:-1], -1, self.head_dim)
        q, (k_prefix, v_prefix) = attn.q_proj(x).view(shape), kv
        if self.cfg.is_cross(i):  # the prefix's keys/values, re-projected; action positions start at 0
            b, p = k_prefix.shape[:2]
            k = attn.k_proj(k_prefix.reshape(b, p, -1).to(x.dtype)).view(b, p, -1, self.head_dim)
            v = attn.v_proj(v_prefix.reshape(b, p, -1).to(x.dtype)).view(b, p, -1, self.head_dim)
            pos = torch.arange(h.shape[1], device=h.device).expand(h.shape[0], -1)
            out = attention(rope(q, pos), k, v, mask_cross)
        else:  # joint: the cached prefix plus the action tokens themselves, at positions after the prefix
            k = torch.cat([k_prefix, rope(attn.k_proj(x).view(shape), pos_self)], 1)
            v = torch.cat([v_prefix, attn.v_proj(x).view(shape)], 1)
            out = attention(rope(q, pos_self), k, v, mask_self)
        return finish_layer(layer, h, out)

    def expert_forward(self, cache: PrefixCache, x: torch.Tensor, tau: torch.Tensor,
                       step: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Velocity [B, H, A] in float32 (A = x's last dim: action_dim or max_action_dim) and the expert's final-normed
        per-token features [B, H, feature_dim]; x normalised, tau [B] (1 = noise). `step` is ignored (no
        shortcut conditioning)."""
        h = self._embed_suffix(pad_last(x, self.cfg.max_action_dim), tau)
        b, n = h.shape[:2]
        prefix = cache.mask
        steps = torch.arange(n, device=h.device)
        pos_self = prefix.sum(-1, keepdim=True) + steps
        mask_cross = prefix[:, None, :].expand(b, n, prefix.shape[1])
        causal = (steps[None, :] <= steps[:, None]).expand(b, n, n)  # each action sees itself and earlier ones
        mask_self = torch.cat([mask_cross, causal], dim=-1)
        for i, j in enumerate(self.expert_of):
            if j is not None:
                h = self._run(self._expert_layer, i, h, cache.kv[i], pos_self, mask_self, mask_cross)
        feats = self.expert_norm(h)
        v = self.action_out_proj(feats.to(self.action_out_proj.weight.dtype)).float()
        return v[..., : x.shape[-1]], feats

    def velocity(self, cache: PrefixCache, x: torch.Tensor, tau: torch.Tensor,
                 step: torch.Tensor | None = None) -> torch.Tensor:
        return self.expert_forward(cache, x, tau, step)[0]

    # ----- training -----------------------------------------------------------------------------------------
    def flow_matching_loss(self, images, state, text, actions, valid: torch.Tensor | None = None,
                           noise: torch.Tensor | None = None, tau: torch.Tensor | None = None,
                           generator: torch.Generator | None = None) -> torch.Tensor:
        """E || v(x_tau, tau) - (noise - A) ||^2 over all max_action_dim dims (the padded ones included, as
        LeRobot trains SmolVLA) and the valid chunk steps; noise defaults to max_action_dim dims."""
        a = pad_last(self.action_norm(actions), self.cfg.max_action_dim)
        if noise is None:
            noise = torch.randn(a.shape, generator=generator).to(a)
        if tau is None:
            tau = sample_tau(a.shape[0], generator).to(a)
        x_tau, target = interpolate(a, pad_last(noise, self.cfg.max_action_dim), tau)
        v = self.velocity(self.encode_prefix(images, state, text), x_tau, tau)
        err = (v.float() - target.float()).pow(2).mean(-1)  # [B, H]
        if valid is None:
            return err.mean()
        w = valid.to(err.dtype)
        return (err * w).sum() / w.sum().clamp_min(1.0)

    # ----- sampling -----------------------------------------------------------------------------------------
    def denoise(self, cache: PrefixCache, noise: torch.Tensor, num_steps: int) -> torch.Tensor:
        """K Euler steps from noise (tau = 1) to a normalised chunk with noise's shape (tau = 0)."""
        return euler_denoise(lambda x, tau, d: self.velocity(cache, x, tau), noise, num_steps)

    def sample_actions(self, images, state, text, noise: torch.Tensor, num_steps: int | None = None) -> torch.Tensor:
        """Raw action chunk [B, H, action_dim]; noise [B, H, action_dim or max_action_dim] is an explicit input."""
        cache = self.encode_prefix(images, state, text)
        x = self.denoise(cache, noise, num_steps or self.cfg.num_steps)
        return self.action_norm.inverse(x[..., : self.cfg.action_dim])


# ----- loading a LeRobot policy directory -----------------------------------------------------------------------
LEROBOT_PREFIXES = (  # LeRobot's parameter names -> ours (first match wins)
    ("model.vlm_with_expert.vlm.model.vision_model.", "vision."),
    ("model.vlm_with_expert.vlm.model.connector.", "connector."),
    ("model.vlm_with_expert.vlm.model.text_model.embed_tokens.", "embed_tokens."),
    ("model.vlm_with_expert.vlm.model.text_model.layers.", "vlm_layers."),
    ("model.vlm_with_expert.vlm.model.text_model.norm.", "vlm_norm."),
    ("model.vlm_with_expert.lm_expert.layers.", "expert_layers."),
    ("model.vlm_with_expert.lm_expert.norm.", "expert_norm."),
    ("model.", ""),
)
LM_HEAD = "model.vlm_with_expert.vlm.lm_head.weight"  # the backbone's text head: unused by the policy
LEGACY_NORMALISERS = ("normalize_inputs.", "normalize_targets.", "unnormalize_outputs.")


def from_lerobot_keys(weights: dict[str, torch.Tensor], num_vlm_layers: int, tied: bool) -> dict[str, torch.Tensor]:
    """Our names for a LeRobot SmolVLA state dict. Tolerated: a missing "model." prefix, the unused text head,
    layers of the backbone past num_vlm_layers (SmolVLA drops them), legacy normaliser buffers (read as stats),
    and an embedding stored only as the tied text head."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in weights.items():
        if key.startswith(LEGACY_NORMALISERS):
            continue
        key = key if key.startswith("model.") else "model." + key
        if key == LM_HEAD:
            continue
        for theirs, ours in LEROBOT_PREFIXES:
            if key.startswith(theirs):
                key = ours + key[len(theirs):]
                break
        m = re.match(r"vlm_layers\.(\d+)\.", key)
        if m and int(m.group(1)) >= num_vlm_layers:
            continue
        out[key] = tensor
    if tied and "embed_tokens.weight" not in out:
        head = weights.get(LM_HEAD, weights.get(LM_HEAD[len("model."):]))
        if head is not None:
            out["embed_tokens.weight"] = head
    return out


def to_lerobot_key(key: str) -> str:
    """The LeRobot name of one of our parameter names (for error messages)."""
    for theirs, ours in LEROBOT_PREFIXES:
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return key


def _int(raw: dict, key: str, default: int, where: str, low: int = 1) -> int:
    v = raw.get(key, default)
    if type(v) is not int or v < low:
        raise UserError(f"{where}: {key} must be a whole number >= {low}, got {v!r}")
    return v


def _feature_dim(features: object, key: str, where: str) -> int:
    f = features.get(key) if isinstance(features, dict) else None
    shape = f.get("shape") if isinstance(f, dict) else None
    if not (isinstance(shape, list) and len(shape) == 1 and type(shape[0]) is int and shape[0] > 0):
        raise UserError(f"{where}: needs the feature {key!r} with a one-dimensional shape, got {f!r}")
    return shape[0]


def config_from_lerobot(raw: dict, vlm_config, where: str) -> SmolVLAConfig:
    """Our config from LeRobot's config.json (its defaults for absent fields) and the backbone's config."""
    for key in ("add_image_special_tokens", "adapt_to_pi_aloha", "use_delta_joint_actions_aloha"):
        if raw.get(key):
            raise UserError(f"{where}: {key}=true is not supported for SmolVLA")
    text = vlm_config.text_config
    if text.model_type != "llama":
        raise UserError(f"{where}: the backbone's language model is {text.model_type!r}; SmolVLA needs a llama one")
    inputs = raw.get("input_features")
    if not isinstance(inputs, dict):
        raise UserError(f"{where}: input_features must be a mapping")
    empty = _int(raw, "empty_cameras", 0, where, low=0)
    cameras = tuple(k.removeprefix(IMAGE_PREFIX) for k, f in inputs.items()
                    if isinstance(f, dict) and f.get("type") == "VISUAL"
                    and not re.fullmatch(r"empty_camera_\d+", k.removeprefix(IMAGE_PREFIX)))
    vlm_layers = raw.get("num_vlm_layers", 16)
    vlm_layers = text.num_hidden_layers if isinstance(vlm_layers, int) and vlm_layers <= 0 else vlm_layers
    if type(vlm_layers) is not int or vlm_layers > text.num_hidden_layers:
        raise UserError(f"{where}: num_vlm_layers {vlm_layers!r} is not within the backbone's "
                        f"{text.num_hidden_layers} layers")
    expert_layers = raw.get("num_expert_layers", -1)
    expert_layers = vlm_layers if isinstance(expert_layers, int) and expert_layers <= 0 else expert_layers
    if type(expert_layers) is not int or vlm_layers % expert_layers:
        raise UserError(f"{where}: num_vlm_layers {vlm_layers} is not a multiple of num_expert_layers "
                        f"{expert_layers!r}")
    resize = raw.get("resize_imgs_with_padding", [512, 512])
    if resize is not None and not (isinstance(resize, list) and len(resize) == 2
                                   and all(type(r) is int and r > 0 for r in resize)):
        raise UserError(f"{where}: resize_imgs_with_padding must be [width, height] or null, got {resize!r}")
    multiplier = raw.get("expert_width_multiplier", 0.75)
    if type(multiplier) not in (int, float) or not 0 < multiplier <= 4:
        raise UserError(f"{where}: expert_width_multiplier must be a number in (0, 4], got {multiplier!r}")
    mode = raw.get("attention_mode", "cross_attn")
    if mode not in ("cross_attn", "self_attn"):
        raise UserError(f"{where}: attention_mode must be cross_attn or self_attn, got {mode!r}")
    cfg = SmolVLAConfig(
        horizon=_int(raw, "chunk_size", 50, where), action_dim=_feature_dim(raw.get("output_features"), ACTION_KEY,
                                                                            where),
        state_dim=_feature_dim(inputs, STATE_KEY, where), num_steps=_int(raw, "num_steps", 10, where),
        exec_steps=_int(raw, "n_action_steps", 50, where), camera_names=cameras,
        image_size=vlm_config.vision_config.image_size, max_text_len=_int(raw, "tokenizer_max_length", 48, where),
        max_state_dim=_int(raw, "max_state_dim", 32, where), max_action_dim=_int(raw, "max_action_dim", 32, where),
        resize=tuple(resize) if resize is not None else None, empty_cameras=empty, num_vlm_layers=vlm_layers,
        num_expert_layers=expert_layers, self_attn_every_n_layers=_int(raw, "self_attn_every_n_layers", 2, where,
                                                                       low=-(2 ** 31)),
        cross_attention=mode == "cross_attn", expert_width_multiplier=float(multiplier),
        min_period=float(raw.get("min_period", 4e-3)), max_period=float(raw.get("max_period", 4.0)),
        vlm_model_name=str(raw.get("vlm_model_name", DEFAULT_BACKBONE)))
    if cfg.exec_steps > cfg.horizon:
        raise UserError(f"{where}: n_action_steps {cfg.exec_steps} exceeds chunk_size {cfg.horizon}")
    if cfg.state_dim > cfg.max_state_dim or cfg.action_dim > cfg.max_action_dim:
        raise UserError(f"{where}: state/action dims {cfg.state_dim}/{cfg.action_dim} exceed max_state_dim/"
                        f"max_action_dim {cfg.max_state_dim}/{cfg.max_action_dim}")
    every = vlm_layers // expert_layers
    if any(cfg.is_cross(i) != cfg.is_cross(i // every) for i in range(0, vlm_layers, every)):
        raise UserError(f"{where}: num_vlm_layers {vlm_layers}, num_expert_layers {expert_layers} and "
                        f"self_attn_every_n_layers {cfg.self_attn_every_n_layers} pair a cross-attention expert "
                        "layer with a self-attention VLM layer (SmolVLA cannot run that layout)")
    return cfg


def _find_tokenizer(directory: Path, backbone: Path, max_len: int) -> SmolVLATokenizer:
    """tokenizer.json of the checkpoint directory, else of the backbone's directory."""
    for d in (directory, backbone):
        if (d / "tokenizer.json").is_file():
            return SmolVLATokenizer.from_file(d / "tokenizer.json", max_len)
    raise UserError(f"no tokenizer.json in {directory} or in the backbone directory {backbone} (copy the SmolVLM "
                    "tokenizer files, tokenizer.json and tokenizer_config.json, into the checkpoint directory)")


def load_smolvla(directory: str | Path) -> SmolVLAPolicy:
    """A SmolVLA policy saved by LeRobot (config.json type "smolvla", model.safetensors, processor stats files),
    with its backbone config and tokenizer; every mismatch is one UserError line."""
    from transformers import SmolVLMConfig

    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory")
    where = str(directory / "config.json")
    raw = read_json(directory / "config.json")
    if raw.get("type") != "smolvla":
        raise UserError(f"{where}: type is {raw.get('type')!r}, not 'smolvla'")
    backbone = resolve_backbone(directory, str(raw.get("vlm_model_name", DEFAULT_BACKBONE)))
    try:
        vlm_config = SmolVLMConfig(**read_json(backbone / "config.json"))
    except (TypeError, ValueError, KeyError) as e:
        raise UserError(f"{backbone / 'config.json'} is not a SmolVLM config: {' '.join(str(e).split())}") from None
    cfg = config_from_lerobot(raw, vlm_config, where)
    tokenizer = _find_tokenizer(directory, backbone, cfg.max_text_len)
    if tokenizer.vocab_size > vlm_config.text_config.vocab_size:
        raise UserError(f"tokenizer has {tokenizer.vocab_size} tokens but the backbone's embedding has "
                        f"{vlm_config.text_config.vocab_size}: it belongs to another model")
    weights = read_weights(directory)
    stats, eps = read_mean_std(directory, weights)
    norms = []
    for key, dim in ((STATE_KEY, cfg.state_dim), (ACTION_KEY, cfg.action_dim)):
        mean, std = stats[f"{key}.mean"], stats[f"{key}.std"]
        if tuple(mean.shape) != (dim,) or tuple(std.shape) != (dim,):
            raise UserError(f"{directory}: normaliser {key} statistics have shapes {list(mean.shape)}/"
                            f"{list(std.shape)} but config.json gives {key} {dim} dims")
        norms.append(MeanStdNormalizer(mean, std, eps))
    model = SmolVLAPolicy(cfg, vlm_config, *norms, tokenizer)
    tied = bool(vlm_config.tie_word_embeddings or vlm_config.text_config.tie_word_embeddings)
    tensors = from_lerobot_keys(weights, cfg.num_vlm_layers, tied)
    check_state_dict(model, tensors, str(directory / "model.safetensors"), skip=("state_norm.", "action_norm."),
                     name=to_lerobot_key)
    model.load_state_dict(tensors, strict=False)
    return model.eval()
