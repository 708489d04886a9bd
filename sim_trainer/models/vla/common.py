"""What pi0 and pi0.5 share: PaliGemma (SigLIP + Gemma) for the prefix, a Gemma action expert, joint attention.

The prefix (camera images and the prompt) goes once through the language model; each of its layers leaves its
keys (after RoPE) and values in a `PrefixCache`. The action expert then runs K times on the suffix (the noisy
action chunk), its queries attending to [cached prefix keys; its own keys] under one mask: the joint
"mixture by token" attention of pi0, computed without ever recomputing the prefix. Training uses the same two
passes (the prefix never attends to the suffix, so this equals one joint pass).

Module names mirror the checkpoint's sub-trees (`lm`, `expert`, `vision`, `projector`) so the loader maps keys
by prefix; the vision tower and MLPs are transformers' SigLIP / Gemma modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GemmaConfig, SiglipVisionConfig, SiglipVisionModel
from transformers.models.gemma.modeling_gemma import GemmaMLP, GemmaRMSNorm

from sim_trainer.models.flow import euler_denoise, interpolate, masked_mse, sample_tau
from sim_trainer.models.interface import PrefixCache

MASK_VALUE = -2.3819763e38  # masked attention logits (pi0's value; finite, so no NaN rows)
RMS_EPS = 1e-6
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class GemmaDims:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 256
    vocab_size: int = 0  # 0: no token embedding (the action expert)


@dataclass(frozen=True)
class VisionDims:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int
    image_size: int


@dataclass
class VLAConfig:
    """Sizes and chunking of a PaliGemma-based flow VLA; the names the pipeline reads match ModelConfig's."""

    lm: GemmaDims
    expert: GemmaDims
    vision: VisionDims
    camera_names: tuple[str, ...]
    state_dim: int  # the robot's (raw, unpadded) state size
    action_dim: int  # the robot's action size
    horizon: int = 50  # H: actions per chunk
    exec_steps: int = 50  # C: actions executed before asking again
    num_steps: int = 10  # K: default denoising steps
    max_text_len: int = 48
    max_state_dim: int = 32  # state and actions are zero-padded to these inside the model
    max_action_dim: int = 32
    empty_cameras: int = 0  # extra image slots that are always masked
    min_period: float = 4e-3
    max_period: float = 4.0
    pad_token_id: int = 0
    gradient_checkpointing: bool = False
    extra: dict = field(default_factory=dict)  # model-specific settings (e.g. pi0.5's state prompt)

    @property
    def image_size(self) -> int:
        return self.vision.image_size


# The eps of each convention: LeRobot divides by std + 1e-8 (a quantile span gets eps only when it is 0) and
# multiplies back by std alone; openpi adds 1e-6 to std and to the quantile span in both directions.
NORM_EPS = {"lerobot": 1e-8, "openpi": 1e-6}


class StatsNormalizer(nn.Module):
    """Normalisation as buffers: mean_std (x - mean) / (std + eps), quantiles to [-1, 1] over [q01, q99], or
    identity; `inverse` maps model outputs back to raw units. `convention` ("lerobot", "openpi") says where the
    eps goes, so a checkpoint is normalised exactly as the code that trained it did."""

    def __init__(self, mode: str, stats: dict[str, torch.Tensor], eps: float | None = None,
                 convention: str = "lerobot"):
        super().__init__()
        if convention not in NORM_EPS:
            raise ValueError(f"unknown normalisation convention {convention!r}; use one of {', '.join(NORM_EPS)}")
        self.mode, self.convention = mode, convention
        self.eps = NORM_EPS[convention] if eps is None else eps
        needs = {"mean_std": ("mean", "std"), "quantiles": ("q01", "q99"), "identity": ()}[mode]
        for k in needs:
            self.register_buffer(k, torch.as_tensor(stats[k], dtype=torch.float32))

    def _span(self) -> torch.Tensor:
        d = self.q99 - self.q01
        if self.convention == "openpi":
            return d + self.eps
        return torch.where(d == 0, torch.full_like(d, self.eps), d)

    def _inverse_std(self) -> torch.Tensor:
        return self.std + self.eps if self.convention == "openpi" else self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "mean_std":
            return (x - self.mean) / (self.std + self.eps)
        if self.mode == "quantiles":
            return 2.0 * (x - self.q01) / self._span() - 1.0
        return x

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "mean_std":
            return x * self._inverse_std() + self.mean
        if self.mode == "quantiles":
            return (x + 1.0) * self._span() / 2.0 + self.q01
        return x


# ----- small functions ---------------------------------------------------------------------------------------
def sincos_time(tau: torch.Tensor, dim: int, min_period: float, max_period: float) -> torch.Tensor:
    """Sine-cosine embedding of flow time [B] -> [B, dim], periods geometric in [min, max]; computed in float64
    (the high frequencies need it) and returned in tau's dtype."""
    dt = torch.float32 if tau.device.type == "mps" else torch.float64
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=dt, device=tau.device)
    period = min_period * (max_period / min_period) ** fraction
    ang = (1.0 / period * 2 * math.pi)[None, :] * tau[:, None].to(dt)
    return torch.cat([ang.sin(), ang.cos()], dim=1).to(tau.dtype)


def ar_mask_2d(valid: torch.Tensor, ar: torch.Tensor) -> torch.Tensor:
    """Block attention from per-token "starts a new block" flags: token i sees valid token j iff j's block
    index is <= i's; [B, N] -> [B, N, N] bool."""
    blocks = torch.cumsum(ar.to(torch.int64), dim=1)
    return (blocks[:, None, :] <= blocks[:, :, None]) & valid[:, None, :] & valid[:, :, None]


def rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10_000.0) -> torch.Tensor:
    """Rotary position embedding (half-split) of x [B, heads, N, d] at integer positions [B, N], in float32."""
    d = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64, device=x.device).float() / d))
    freqs = positions.float()[:, :, None] * inv_freq[None, None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos().to(x.dtype)[:, None], emb.sin().to(x.dtype)[:, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax attention (fp32 softmax) of q [B, h, Nq, d] over k, v [B, kv, Nk, d] under mask [B, Nq, Nk];
    returns [B, Nq, h * d]. Query heads are grouped per kv head (head i uses kv head i // (h / kv)), so the
    shared keys and values are never copied per head; written out so it exports to ONNX."""
    b, h, nq, d = q.shape
    kv = k.shape[1]
    logits = torch.matmul(q.reshape(b, kv, (h // kv) * nq, d), k.transpose(2, 3)).view(b, h, nq, -1) * d ** -0.5
    logits = logits.masked_fill(~mask[:, None], MASK_VALUE)
    probs = logits.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs.view(b, kv, (h // kv) * nq, -1), v).view(b, h, nq, d)
    return out.transpose(1, 2).reshape(b, nq, h * d)


def resize_with_pad(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> uint8 [B, size, size, 3]: keep the aspect ratio, pad with black (-1 once scaled)."""
    b, h, w, _ = images.shape
    if h == size and w == size:
        return images
    ratio = max(w / size, h / size)
    rh, rw = int(h / ratio), int(w / ratio)
    x = F.interpolate(images.permute(0, 3, 1, 2).float(), size=(rh, rw), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8)
    top, left = (size - rh) // 2, (size - rw) // 2
    x = F.pad(x, (left, size - rw - left, top, size - rh - top), value=0)
    return x.permute(0, 2, 3, 1)


def pad_last(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x if x.shape[-1] >= dim else F.pad(x, (0, dim - x.shape[-1]))


# ----- Gemma layers --------------------------------------------------------------------------------------------
class AdaRMSNorm(nn.Module):
    """pi0.5's time-conditioned RMSNorm: a dense layer of the condition gives (scale, shift, gate); the gate
    multiplies the branch output in the residual."""

    def __init__(self, width: int, cond_dim: int, eps: float = RMS_EPS):
        super().__init__()
        self.eps = eps
        self.dense = nn.Linear(cond_dim, 3 * width)
        nn.init.zeros_(self.dense.weight)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normed = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        scale, shift, gate = self.dense(cond.to(self.dense.weight.dtype))[:, None, :].chunk(3, dim=-1)
        return (normed * (1 + scale.float()) + shift.float()).to(x.dtype), gate.to(x.dtype)


def apply_norm(norm: nn.Module, x: torch.Tensor, cond: torch.Tensor | None):
    """(normed x, residual gate or None) for a plain Gemma RMSNorm or an adaptive one."""
    return norm(x, cond) if isinstance(norm, AdaRMSNorm) else (norm(x), None)


def gated(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    return x + y if gate is None else x + y * gate


class SelfAttentionProj(nn.Module):
    def __init__(self, d: GemmaDims):
        super().__init__()
        self.q_proj = nn.Linear(d.width, d.num_heads * d.head_dim, bias=False)
        self.k_proj = nn.Linear(d.width, d.num_kv_heads * d.head_dim, bias=False)
        self.v_proj = nn.Linear(d.width, d.num_kv_heads * d.head_dim, bias=False)
        self.o_proj = nn.Linear(d.num_heads * d.head_dim, d.width, bias=False)


class GemmaLayer(nn.Module):
    """One pre-norm Gemma block, split around attention so two streams can attend jointly."""

    def __init__(self, d: GemmaDims, cond_dim: int | None):
        super().__init__()
        self.dims = d
        self.self_attn = SelfAttentionProj(d)
        self.mlp = GemmaMLP(GemmaConfig(hidden_size=d.width, intermediate_size=d.mlp_dim,
                                        hidden_act="gelu_pytorch_tanh"))
        norm = (lambda: AdaRMSNorm(d.width, cond_dim)) if cond_dim else (lambda: GemmaRMSNorm(d.width, RMS_EPS))
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()

    def qkv(self, x: torch.Tensor, positions: torch.Tensor, cond: torch.Tensor | None):
        """Queries, keys (both after RoPE), values [B, heads, N, hd] and the attention residual gate."""
        h, gate = apply_norm(self.input_layernorm, x, cond)
        b, n, _ = h.shape
        a, d = self.self_attn, self.dims
        h = h.to(a.q_proj.weight.dtype)  # the stream keeps its dtype; each linear runs in its weights' dtype
        q = a.q_proj(h).view(b, n, d.num_heads, d.head_dim).transpose(1, 2)
        k = a.k_proj(h).view(b, n, d.num_kv_heads, d.head_dim).transpose(1, 2)
        v = a.v_proj(h).view(b, n, d.num_kv_heads, d.head_dim).transpose(1, 2)
        return rope(q, positions), rope(k, positions), v, gate

    def finish(self, x: torch.Tensor, att: torch.Tensor, gate, cond: torch.Tensor | None) -> torch.Tensor:
        x = gated(x, self.self_attn.o_proj(att.to(self.self_attn.o_proj.weight.dtype)), gate)
        h, gate2 = apply_norm(self.post_attention_layernorm, x, cond)
        return gated(x, self.mlp(h.to(self.mlp.gate_proj.weight.dtype)), gate2)


class GemmaStack(nn.Module):
    def __init__(self, d: GemmaDims, cond_dim: int | None = None):
        super().__init__()
        if d.vocab_size:
            self.embed_tokens = nn.Embedding(d.vocab_size, d.width)
        self.layers = nn.ModuleList(GemmaLayer(d, cond_dim) for _ in range(d.depth))
        self.norm = AdaRMSNorm(d.width, cond_dim) if cond_dim else GemmaRMSNorm(d.width, RMS_EPS)


# ----- the model ---------------------------------------------------------------------------------------------
class PaliGemmaFlowPolicy(nn.Module):
    """The shared body of pi0 and pi0.5; subclasses define the prompt, the state's place and time conditioning.

    Interface (the pipeline's FlowPolicy): tokenize, encode_prefix, expert_forward, velocity, flow_matching_loss,
    denoise, sample_actions, parameter_groups, state_norm / action_norm, cfg, feature_dim (expert width: the
    per-token features) and pooled_dim (language-model width: PrefixCache.pooled, the mean of the valid prefix
    tokens' final hidden states).
    """

    time_cond_dim: int | None = None  # width of the expert's adaRMS condition (pi0.5); None: plain RMSNorm
    checkpoint_renames: dict[str, str] = {}  # checkpoint key starts another name for (old -> ours)

    def __init__(self, cfg: VLAConfig, state_norm: StatsNormalizer, action_norm: StatsNormalizer, tokenizer=None):
        super().__init__()
        self.cfg, self.tokenizer = cfg, tokenizer
        self.state_norm, self.action_norm = state_norm, action_norm
        v = cfg.vision
        self.vision = SiglipVisionModel(SiglipVisionConfig(
            hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth,
            num_attention_heads=v.num_heads, patch_size=v.patch_size, image_size=v.image_size,
            layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", vision_use_head=False,
            attn_implementation="eager"))
        self.projector = nn.Linear(v.width, cfg.lm.width)
        self.lm = GemmaStack(cfg.lm)
        self.expert = GemmaStack(cfg.expert, self.time_cond_dim)
        we = cfg.expert.width
        self.action_in_proj = nn.Linear(cfg.max_action_dim, we)
        self.action_out_proj = nn.Linear(we, cfg.max_action_dim)
        self.feature_dim, self.pooled_dim = we, cfg.lm.width

    # ----- hooks for the subclasses ------------------------------------------------------------------------------
    def prompt(self, instructions: list[str]) -> list[str]:
        raise NotImplementedError

    def prompt_tokens(self, text: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix's token ids and their validity from the instruction ids and the raw state (pi0.5 writes
        the state in here); padding may sit anywhere, as positions count only valid tokens."""
        return text, text != self.cfg.pad_token_id

    def state_tokens(self, state_normed: torch.Tensor) -> torch.Tensor | None:
        """Expert-stream tokens [B, n, We] that follow the prefix and precede the actions, or None."""
        return None

    def action_tokens(self, x: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Suffix embeddings of the padded noisy chunk and the adaRMS condition (None for plain norms)."""
        raise NotImplementedError

    # ----- text --------------------------------------------------------------------------------------------------
    def tokenize(self, instructions: list[str]) -> torch.Tensor:
        """Token ids [B, max_text_len] of the instruction's part of the prompt, right-padded with the pad id (the
        model's own tokenizer, loaded from the checkpoint directory). Nothing here depends on the state, so a
        robot tokenises an instruction once."""
        if self.tokenizer is None:
            raise ValueError("this model was built without a tokenizer")
        tok = self.tokenizer
        tok.enable_truncation(self.cfg.max_text_len)
        tok.enable_padding(length=self.cfg.max_text_len, pad_id=self.cfg.pad_token_id, direction="right")
        enc = tok.encode_batch(self.prompt(list(instructions)))
        return torch.tensor([e.ids for e in enc], dtype=torch.long)

    # ----- prefix ------------------------------------------------------------------------------------------------
    def _ckpt(self, fn, *args):
        if self.cfg.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _embed_images(self, images: dict[str, torch.Tensor], b: int, device) -> tuple[list, list]:
        embs, masks = [], []
        n_img = (self.cfg.vision.image_size // self.cfg.vision.patch_size) ** 2
        for name in (*self.cfg.camera_names, *[None] * self.cfg.empty_cameras):
            img = images.get(name) if name is not None else None
            if img is None:  # a missing camera: invisible to every token, does not advance positions
                embs.append(torch.zeros(b, n_img, self.cfg.lm.width, device=device, dtype=self.projector.weight.dtype))
                masks.append(torch.zeros(b, n_img, dtype=torch.bool, device=device))
                continue
            img = resize_with_pad(img.to(device), self.cfg.image_size)
            pixels = (img.float() / 255.0 * 2.0 - 1.0).permute(0, 3, 1, 2).to(self.projector.weight.dtype)
            feats = self._ckpt(lambda p: self.projector(self.vision(pixel_values=p).last_hidden_state), pixels)
            embs.append(feats)
            masks.append(torch.ones(b, feats.shape[1], dtype=torch.bool, device=device))
        return embs, masks

    def encode_prefix(self, images: dict[str, torch.Tensor], state: torch.Tensor, text: torch.Tensor
                      ) -> PrefixCache:
        """images: uint8 [B, H, W, 3] per camera name (missing ones are masked); state: raw [B, S]; text: ids."""
        b, device = state.shape[0], state.device
        embs, masks = self._embed_images(images, b, device)
        ids, text_valid = self.prompt_tokens(text.to(device), state)
        embs.append(self.lm.embed_tokens(ids) * math.sqrt(self.cfg.lm.width))
        masks.append(text_valid)
        x, valid = torch.cat(embs, 1), torch.cat(masks, 1)
        positions = torch.cumsum(valid.long(), 1) - 1
        mask = valid[:, None, :] & valid[:, :, None]
        kv = []
        for layer in self.lm.layers:
            x, k, v = self._ckpt(self._prefix_layer, layer, x, positions, mask)
            kv.append((k, v))
        hidden = self.lm.norm(x)
        m = valid.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        cache = PrefixCache(kv=kv, mask=valid, pooled=pooled)
        extra = self.state_tokens(pad_last(self.state_norm(state), self.cfg.max_state_dim))
        return cache if extra is None else self._append_to_cache(cache, extra)

    @staticmethod
    def _prefix_layer(layer: GemmaLayer, x, positions, mask):
        q, k, v, gate = layer.qkv(x, positions, None)
        return layer.finish(x, attend(q, k, v, mask), gate, None), k, v

    def _append_to_cache(self, cache: PrefixCache, tokens: torch.Tensor) -> PrefixCache:
        """Run expert tokens that do not depend on (x, tau) once and append their keys/values to the cache.

        pi0's state token sees the prefix and itself, and only the actions see it, so its per-layer keys and
        values are the same at every denoising step: computing them here equals one joint pass over state and actions.
        """
        _, kv = self._expert_pass(cache, tokens, None, keep_kv=True)
        n = tokens.shape[1]
        ones = torch.ones(tokens.shape[0], n, dtype=torch.bool, device=tokens.device)
        kv = [(torch.cat([pk, k], 2), torch.cat([pv, v], 2)) for (pk, pv), (k, v) in zip(cache.kv, kv, strict=True)]
        return PrefixCache(kv=kv, mask=torch.cat([cache.mask, ones], 1), pooled=cache.pooled)

    # ----- action expert -----------------------------------------------------------------------------------------
    def _expert_pass(self, cache: PrefixCache, x: torch.Tensor, cond: torch.Tensor | None, keep_kv: bool = False):
        """Expert tokens x [B, N, We] attending to the cache and to each other (bidirectionally)."""
        b, n, _ = x.shape
        offset = cache.mask.sum(-1, keepdim=True)
        positions = offset + torch.arange(n, device=x.device)[None]
        mask = torch.cat([cache.mask[:, None, :].expand(b, n, -1),
                          torch.ones(b, n, n, dtype=torch.bool, device=x.device)], dim=2)
        kv = []
        for layer, (pk, pv) in zip(self.expert.layers, cache.kv, strict=True):
            x, k, v = self._ckpt(self._expert_layer, layer, x, positions, mask, pk, pv, cond)
            kv.append((k, v))
        return apply_norm(self.expert.norm, x, cond)[0], (kv if keep_kv else None)

    @staticmethod
    def _expert_layer(layer: GemmaLayer, x, positions, mask, pk, pv, cond):
        q, k, v, gate = layer.qkv(x, positions, cond)
        att = attend(q, torch.cat([pk.to(k.dtype), k], 2), torch.cat([pv.to(v.dtype), v], 2), mask)
        return layer.finish(x, att, gate, cond), k, v

    def expert_forward(self, cache: PrefixCache, x: torch.Tensor, tau: torch.Tensor,
                       step: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Velocity [B, H, A'] and per-action-token features [B, H, feature_dim] at (x, tau).

        x is the normalised noisy chunk, either the robot's A action dims (the padding dims are held at zero) or
        already padded to max_action_dim (as LeRobot's sampler does); v has x's width. `step` is ignored.
        """
        width = x.shape[-1]
        tokens, cond = self.action_tokens(pad_last(x, self.cfg.max_action_dim), tau)
        hidden, _ = self._expert_pass(cache, tokens, cond)
        feats = hidden[:, -x.shape[1]:].float()
        v = self.action_out_proj(feats.to(self.action_out_proj.weight.dtype)).to(x.dtype)
        return v[..., :width], feats

    def velocity(self, cache: PrefixCache, x: torch.Tensor, tau: torch.Tensor,
                 step: torch.Tensor | None = None) -> torch.Tensor:
        return self.expert_forward(cache, x, tau)[0]

    # ----- training and sampling -------------------------------------------------------------------------------
    def flow_matching_loss(self, images, state, text, actions, valid: torch.Tensor | None = None,
                           noise: torch.Tensor | None = None, tau: torch.Tensor | None = None,
                           generator: torch.Generator | None = None) -> torch.Tensor:
        """MSE between v(x_tau, tau) and noise - actions over the robot's action dims (and valid chunk steps);
        noise may be [B, H, A] or padded to max_action_dim."""
        a = self.action_norm(actions)
        if noise is None:
            noise = torch.randn(a.shape, generator=generator).to(a)
        if tau is None:
            tau = sample_tau(a.shape[0], generator).to(a)
        x_tau, target = interpolate(pad_last(a, noise.shape[-1]), noise, tau)
        v = self.velocity(self.encode_prefix(images, state, text), x_tau, tau)
        dims = actions.shape[-1]
        return masked_mse(v[..., :dims], target[..., :dims], valid)

    def denoise(self, cache: PrefixCache, noise: torch.Tensor, num_steps: int) -> torch.Tensor:
        """K Euler steps from tau = 1 (noise) to tau = 0; the result has the noise's width."""
        return euler_denoise(lambda x, tau, d: self.velocity(cache, x, tau), noise, num_steps)

    def sample_actions(self, images, state, text, noise: torch.Tensor, num_steps: int | None = None
                       ) -> torch.Tensor:
        """Raw action chunk [B, H, A] (the noise is an explicit input: [B, H, A] or padded)."""
        cache = self.encode_prefix(images, state, text)
        chunk = self.denoise(cache, noise, num_steps or self.cfg.num_steps)
        return self.action_norm.inverse(chunk[..., : self.cfg.action_dim])

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """vision (SigLIP + projector), language (Gemma LM), expert (action expert), heads (the rest), and
        lora (the language model's LoRA adapters) once `enable_lora` added them."""
        lm = dict(self.lm.named_parameters())
        groups = {"vision": [*self.vision.parameters(), *self.projector.parameters()],
                  "language": [p for n, p in lm.items() if "lora_" not in n],
                  "expert": list(self.expert.parameters())}
        lora = [p for n, p in lm.items() if "lora_" in n]
        if lora:
            groups["lora"] = lora
        taken = {id(p) for ps in groups.values() for p in ps}
        groups["heads"] = [p for p in self.parameters() if id(p) not in taken]
        return groups

    def enable_lora(self, rank: int = 32, alpha: float | None = None, dropout: float = 0.0) -> None:
        """LoRA adapters (peft) on every linear layer of the language model, which is frozen: a 3B model's
        language stream then trains through rank-r updates only (group "lora"). B starts at zero, so the
        outputs do not change until the adapters train."""
        from peft import LoraConfig, inject_adapter_in_model
        config = LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=dropout, target_modules=list(LORA_TARGETS))
        inject_adapter_in_model(config, self.lm)
        self.lora_scale = (alpha or rank) / rank  # what merging the adapters into the weights multiplies B A by
        for name, p in self.lm.named_parameters():
            p.requires_grad_("lora_" in name)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

