"""Replay of chunk transitions for off-policy RL, with n-step returns over chunk steps.

A transition is one chunk step of one env: (obs, executed chunk [C, D], reward, done, truncated, next_obs,
steps). With n-step returns the reward is the discounted sum of `steps` <= n chunk rewards and next_obs the
observation `steps` chunk steps later, so the critic's target is

    y = reward + gamma^steps * (1 - done + truncated) * Q_target(next_obs, a'),

i.e. it bootstraps unless the episode ended, and also where it ended only by the time limit (truncated: its
future was cut off, not finished); an episode that ended by success or failure is not bootstrapped.

The buffer is a fixed ring of preallocated tensors (its memory is known up front, see `nbytes`), sampled with its
own seeded generator; `save`/`load` restore the contents, the write position and the generator, so a resumed run
draws the same minibatches as one never stopped.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import torch

from sim_trainer.errors import UserError
from sim_trainer.trainer_state import load_state, save_state


def transition_shapes(obs_dim: int, chunk_shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {"obs": ((obs_dim,), torch.float32), "chunk": (tuple(chunk_shape), torch.float32),
            "reward": ((), torch.float32), "done": ((), torch.bool), "truncated": ((), torch.bool),
            "next_obs": ((obs_dim,), torch.float32), "steps": ((), torch.int64)}


class ReplayBuffer:
    def __init__(self, capacity: int, obs_dim: int, chunk_shape: tuple[int, int], seed: int):
        self.capacity, self.pos, self.size = capacity, 0, 0
        self.data = {k: torch.zeros((capacity, *shape), dtype=dtype)
                     for k, (shape, dtype) in transition_shapes(obs_dim, chunk_shape).items()}
        self.gen = torch.Generator().manual_seed(seed)

    @staticmethod
    def nbytes(capacity: int, obs_dim: int, chunk_shape: tuple[int, int]) -> int:
        per_row = sum(torch.Size(shape).numel() * dtype.itemsize
                      for shape, dtype in transition_shapes(obs_dim, chunk_shape).values())
        return capacity * per_row

    def add(self, rows: dict[str, torch.Tensor]) -> None:
        """Append a batch of transitions (every field [B, ...]), overwriting the oldest once full."""
        b = len(rows["obs"])
        idx = (self.pos + torch.arange(b)) % self.capacity
        for k, v in self.data.items():
            v[idx] = rows[k].to(v.dtype).cpu()
        self.pos = (self.pos + b) % self.capacity
        self.size = min(self.size + b, self.capacity)

    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        idx = torch.randint(self.size, (batch_size,), generator=self.gen)
        return {k: v[idx] for k, v in self.data.items()}

    def save(self, out: Path, stem: str = "replay") -> None:
        meta = {"capacity": self.capacity, "pos": self.pos, "size": self.size}
        tensors = {k: v[:self.size].contiguous() for k, v in self.data.items()} | {"rng": self.gen.get_state()}
        save_state(out, stem, meta, tensors)

    def load(self, out: Path, stem: str = "replay") -> None:
        meta, tensors = load_state(out, stem)
        if meta.get("capacity") != self.capacity:
            raise UserError(f"cannot resume from {out}: its replay buffer holds {meta.get('capacity')} transitions, "
                            f"this run asks for {self.capacity}")
        size = int(meta["size"])
        for k, v in self.data.items():
            if tensors[k].shape != (size, *v.shape[1:]):
                raise UserError(f"cannot resume from {out}: its replay field {k} has shape "
                                f"{tuple(tensors[k].shape)}, this run needs {(size, *v.shape[1:])}")
            v[:size] = tensors[k]
        self.pos, self.size = int(meta["pos"]), size
        self.gen.set_state(tensors["rng"])


class NStepWindow:
    """Turns each env's stream of chunk transitions into n-step transitions.

    Every env keeps its last n (obs, chunk, reward); a window that is full emits its oldest entry with the
    discounted sum of the n rewards, and an episode's end emits every pending entry with its shorter sum and
    the episode's final observation. Windows are not saved: a resumed run starts every episode again.
    """

    def __init__(self, num_envs: int, n: int, gamma: float):
        self.n, self.gamma = n, gamma
        self.pending: list[deque] = [deque() for _ in range(num_envs)]

    def push(self, obs: torch.Tensor, chunk: torch.Tensor, reward: torch.Tensor, done: torch.Tensor,
             truncated: torch.Tensor, next_obs: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """One chunk step of every env ([N, ...] each; next_obs is the final observation where an episode ended).
        Returns the transitions that are complete, or None."""
        out: list[dict] = []
        for i, window in enumerate(self.pending):
            window.append((obs[i], chunk[i], float(reward[i])))
            if bool(done[i]):
                while window:
                    out.append(self._emit(window, next_obs[i], True, bool(truncated[i])))
            elif len(window) == self.n:
                out.append(self._emit(window, next_obs[i], False, False))
        if not out:
            return None
        return {k: torch.stack([torch.as_tensor(row[k]) for row in out]) for k in out[0]}

    def _emit(self, window: deque, next_obs: torch.Tensor, done: bool, truncated: bool) -> dict:
        ret = sum(self.gamma ** j * r for j, (_, _, r) in enumerate(window))
        obs, chunk, _ = window.popleft()
        return {"obs": obs, "chunk": chunk, "reward": torch.tensor(ret, dtype=torch.float32),
                "done": torch.tensor(done), "truncated": torch.tensor(truncated), "next_obs": next_obs,
                "steps": torch.tensor(len(window) + 1)}
