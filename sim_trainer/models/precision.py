"""Mixed precision for training: bf16 autocast around the model's forward passes, fp32 master weights and optimizer
state, and optionally the frozen parameter groups stored in bf16.

--precision bf16 runs the matrix products (linear, attention, convolution) of the model's forward passes in bf16
under torch.autocast; parameters, gradients and AdamW moments stay fp32. The numbers an update is judged by
(losses, Gaussian log-densities, ratios, advantages, value losses, flow times) are computed in fp32 outside
autocast. --frozen-dtype bf16 stores the groups a run freezes (e.g. --expert-only's vision and language) in bf16:
they are never updated, so they need no fp32 master copy, and a pi0's 2.9 B-parameter prefix takes half the memory.
Checkpoints are always written in fp32 (models/checkpoint.py casts such weights back).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn

from sim_trainer.errors import UserError

PRECISIONS = ("fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PRECISION_HELP = ("fp32, or bf16: the model's forward passes under bf16 autocast (CUDA, or CPU), with fp32 weights, "
                  "optimizer state, losses and log-probabilities")
FROZEN_DTYPE_HELP = ("fp32, or bf16: store the frozen groups (--expert-only, --freeze-vision) in bf16, half their "
                     "memory (needs --precision bf16; checkpoints stay fp32)")


def check_precision(precision: str, frozen_dtype: str, frozen: tuple[str, ...], fsdp: bool = False) -> None:
    """One line for a value that is not one of the choices or a frozen dtype with nothing to apply it to."""
    for name, value in (("precision", precision), ("frozen_dtype", frozen_dtype)):
        if value not in PRECISIONS:
            raise UserError(f"unknown {name} {value!r}; choose one of {', '.join(PRECISIONS)}")
    if frozen_dtype == "bf16":
        if precision != "bf16":
            raise UserError("frozen_dtype bf16 needs precision bf16 (the bf16 weights are used under autocast)")
        if not frozen:
            raise UserError("frozen_dtype bf16 stores frozen groups in bf16, but nothing is frozen: add "
                            "--expert-only or --freeze-vision")
        if fsdp:
            raise UserError("frozen_dtype bf16 is not supported with --fsdp (FSDP shards the model as one unit of "
                            "a single dtype); use frozen_dtype fp32")


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """bf16: torch.autocast on the device's type (CUDA; CPU autocast supports bf16 too); fp32: no change."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[precision])


def store_frozen(groups: dict[str, list[nn.Parameter]], frozen: Iterable[str], dtype: str) -> int:
    """Cast the parameters of the frozen groups to `dtype` in place (they must not require grad); returns how many
    numbers were cast. A parameter shared with a trainable group is left alone."""
    if dtype == "fp32":
        return 0
    frozen = set(frozen)
    trainable = {id(p) for name, ps in groups.items() if name not in frozen for p in ps}
    n = 0
    for name in frozen:
        for p in groups.get(name, []):
            if id(p) in trainable or p.requires_grad or p.dtype == DTYPES[dtype]:
                continue
            p.data = p.data.to(DTYPES[dtype])
            n += p.numel()
    return n


def full_precision(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights with every 16-bit float tensor cast to fp32: what a checkpoint holds whatever the run stored."""
    return {k: v.float() if v.dtype in (torch.bfloat16, torch.float16) else v for k, v in weights.items()}
