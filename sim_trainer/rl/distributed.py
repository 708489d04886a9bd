"""Data-parallel training with torch.distributed, started by torchrun (NCCL on GPUs, gloo on CPU).

Every rank steps its own envs with its own seeds; gradients are averaged with an explicit all-reduce
after backward (so the update reads like the single-process one), metrics are averaged, and rank 0 alone
evaluates and writes checkpoints. Without torchrun's environment this is a world of one. With --fsdp (SFT and
RL) the model is sharded over the world instead (shard_model) and FSDP's backward averages the gradients.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    size: int = 1
    comm_device: torch.device = torch.device("cpu")  # where collectives run (NCCL needs CUDA tensors)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def init(cls) -> World:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return cls()
        comm = torch.device("cpu")
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            comm = torch.device("cuda", local)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if comm.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), comm)

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Start every rank from rank 0's weights (heads are randomly initialised)."""
        if self.size > 1:
            for t in module.state_dict().values():
                dist.broadcast(t, src=0)

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Average the gradients over ranks, for the parameters that have one on every rank.

        The others get none on every rank, so the optimizer skips them as a single process would: a zero
        gradient would still advance AdamW's step count and moments (e.g. the actor during critic warm-up),
        and the runs would part after it.
        """
        if self.size == 1:
            return
        params = list(params)
        has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=self.comm_device)
        dist.all_reduce(has_grad, op=dist.ReduceOp.MIN)
        for p, everywhere in zip(params, has_grad.tolist(), strict=True):
            if not everywhere:
                p.grad = None
                continue
            dist.all_reduce(p.grad)
            p.grad /= self.size

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            y = x.to(self.comm_device, copy=True)
            dist.all_reduce(y)
            x = y.to(x.device)
        return x

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        return self.sum(x) / self.size

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def shard_model(model: torch.nn.Module, methods: tuple[str, ...]) -> None:
    """FSDP (torch.distributed.fsdp.fully_shard) over the world, as one unit: each rank holds 1/N of the
    parameters, gradients and optimizer state at rest and gathers the weights while one of `methods` runs (the
    backbones' layers are called through their own methods, not forward, so they cannot be units of their own)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    fully_shard(model)
    for name in methods:
        register_fsdp_forward_method(model, name)


def whole(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor (DTensor) gathered whole, e.g. a gradient norm of sharded gradients (a collective); any
    other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with every sharded tensor gathered whole (a collective: every rank calls it)."""
    return {k: whole(v) for k, v in state.items()}


def print_weights_digest(weights: dict[str, torch.Tensor], rank: int, label: str = "") -> None:
    """Each rank prints the sha256 of the gathered weights, so a run (and its test) can see that the ranks agree.
    One write per line: the ranks share stdout, and an unbuffered stdout would interleave print's two writes."""
    digest = hashlib.sha256(b"".join(v.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes()
                                     for _, v in sorted(weights.items()))).hexdigest()
    sys.stdout.write(f"fsdp rank {rank}: {label}gathered weights sha256 {digest}\n")
    sys.stdout.flush()
