"""The one interface every flow-matching backbone implements, and the only one the pipeline uses.

SFT, the RL samplers and heads, RL-Co, evaluation, the torch backend and the ONNX export see a backbone through
`FlowPolicy` alone, so our small from-scratch model and a pi0-class model are interchangeable in all of them.

What a backbone owns: its tokenizer (instructions only; a model that puts the proprio state into its prompt builds
that part inside `encode_prefix`, so an exported graph takes the same inputs for every backbone), image resizing,
state/action padding and normalisation, and the split of its parameters into named groups a trainer can freeze.

Time convention: x_tau = tau * noise + (1 - tau) * actions, velocity target noise - actions, sampling by Euler
steps from tau = 1 (noise) to tau = 0 (actions).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from sim_trainer.errors import UserError

# vision: image encoders; language: the rest of the prefix encoder (text, state, the language model);
# expert: the action expert (time conditioning, action projections); heads: what a trainer adds (RL noise/value).
PARAMETER_GROUPS = ("vision", "language", "expert", "heads")


@dataclass
class PrefixCache:
    """What the action expert needs from one observation, computed once for all K denoising steps."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per expert layer, [B, heads, P, dh] each
    mask: torch.Tensor  # [B, P] True where the prefix token is real (not padding)
    pooled: torch.Tensor  # [B, pooled_dim] mean of the real prefix tokens (value-head input)

    def first(self, n: int) -> PrefixCache:
        """The cache of the first n samples, detached (for targets computed without gradients)."""
        return PrefixCache([(k[:n].detach(), v[:n].detach()) for k, v in self.kv], self.mask[:n],
                           self.pooled[:n].detach())

    def repeat(self, n: int) -> PrefixCache:
        """Every sample's prefix n times (sample-major), to score n chain steps in one call."""
        return PrefixCache([(k.repeat_interleave(n, 0), v.repeat_interleave(n, 0)) for k, v in self.kv],
                           self.mask.repeat_interleave(n, 0), self.pooled.repeat_interleave(n, 0))


@runtime_checkable
class FlowPolicy(Protocol):
    """A flow-matching VLA backbone. Shapes: images uint8 [B, Hi, Wi, 3] per camera, state raw [B, S], text token
    ids [B, L], chunks [B, H, A] (normalised inside the expert, raw outside)."""

    cfg: Any  # horizon, exec_steps, num_steps, action_dim, state_dim, camera_names, image_size, max_text_len
    feature_dim: int  # width of the expert's per-token features (expert_forward's second output)
    pooled_dim: int  # width of PrefixCache.pooled (the prefix encoder's, which may differ from the expert's)
    state_norm: nn.Module  # raw <-> normalised state (callable, .inverse)
    action_norm: nn.Module  # raw <-> normalised actions

    def tokenize(self, instructions: Sequence[str]) -> torch.Tensor: ...

    def encode_prefix(self, images: dict[str, torch.Tensor], state: torch.Tensor,
                      text: torch.Tensor) -> PrefixCache: ...

    def expert_forward(self, cache: PrefixCache, x: torch.Tensor, tau: torch.Tensor,
                       step: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def velocity(self, cache: PrefixCache, x: torch.Tensor, tau: torch.Tensor,
                 step: torch.Tensor | None = None) -> torch.Tensor: ...

    def flow_matching_loss(self, images: dict[str, torch.Tensor], state: torch.Tensor, text: torch.Tensor,
                           actions: torch.Tensor, valid: torch.Tensor | None = None,
                           noise: torch.Tensor | None = None, tau: torch.Tensor | None = None,
                           generator: torch.Generator | None = None) -> torch.Tensor: ...

    def denoise(self, cache: PrefixCache, noise: torch.Tensor, num_steps: int) -> torch.Tensor: ...

    def sample_actions(self, images: dict[str, torch.Tensor], state: torch.Tensor, text: torch.Tensor,
                       noise: torch.Tensor, num_steps: int | None = None) -> torch.Tensor: ...

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]: ...


def groups_to_freeze(expert_only: bool, freeze_vision: bool, lora: bool = False) -> tuple[str, ...]:
    """The parameter groups the training options freeze: --expert-only vision and language, --freeze-vision
    vision; a LoRA run's language model too (only its adapters train)."""
    frozen = ("vision", "language") if expert_only else ("vision",) if freeze_vision else ()
    return frozen + (("language",) if lora and "language" not in frozen else ())


def freeze_groups(groups: dict[str, list[nn.Parameter]], frozen: Iterable[str]) -> None:
    """Freeze the named groups and make every other group trainable; an unknown group name is a user error."""
    frozen = set(frozen)
    unknown = frozen - set(PARAMETER_GROUPS)
    if unknown:
        raise UserError(f"unknown parameter group(s) {sorted(unknown)}; the groups are {', '.join(PARAMETER_GROUPS)}")
    for name, params in groups.items():
        for p in params:
            p.requires_grad_(name not in frozen)


def check_groups_cover(model: nn.Module, groups: dict[str, list[nn.Parameter]]) -> None:
    """Every parameter in exactly one group (a backbone's own consistency check, used by its tests)."""
    seen: dict[int, str] = {}
    for name, params in groups.items():
        if name not in PARAMETER_GROUPS:
            raise ValueError(f"unknown parameter group {name!r}")
        for p in params:
            if id(p) in seen:
                raise ValueError(f"a parameter is in groups {seen[id(p)]!r} and {name!r}")
            seen[id(p)] = name
    missing = [n for n, p in model.named_parameters() if id(p) not in seen]
    if missing:
        raise ValueError(f"parameters in no group: {missing[:5]}")
