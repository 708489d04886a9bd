"""Vectorised environments with one interface for both simulator backends.

- physx_cpu: one ManiSkill env per spawned process (gymnasium AsyncVectorEnv; the fork context hangs).
- physx_cuda: many envs in one process, batched on the GPU by ManiSkill itself.

No auto-reset: the caller resets whichever envs it wants with the seeds it wants, so evaluation seeds
are explicit and reproducible. Envs reset with the same seed in one call start from the same state on both
backends (GRPO groups rely on it). Everything is returned as torch tensors on `self.device`.

With `privileged`, observations also carry "privileged": the simulator's true low-dimensional state
(make.privileged_state) at the same step, for a privileged critic; the policy never reads it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from policy_runtime.contract import PolicySpec
from sim_trainer.envs.adapter import adapt
from sim_trainer.envs.make import PolicyObsEnv, make_maniskill_env, privileged_state, spec_from_env
from sim_trainer.envs.spec import EnvConfig


@dataclass
class StepResult:
    obs: dict
    reward: torch.Tensor  # [N] float32
    terminated: torch.Tensor  # [N] bool
    truncated: torch.Tensor  # [N] bool
    success: torch.Tensor  # [N] bool


def _make_worker_env(cfg_dict: dict, privileged: bool) -> PolicyObsEnv:
    return PolicyObsEnv(EnvConfig.from_dict(cfg_dict), privileged)


class CpuVecEnv:
    """One ManiSkill env per spawned process; a single env runs in this process.

    Envs may be stepped past their episode's end (evaluation ignores terminations, RL masks what follows):
    gymnasium's SyncVectorEnv refuses that when autoreset is disabled, so the single env is stepped directly.
    """

    def __init__(self, cfg: EnvConfig, num_envs: int, privileged: bool = False):
        from gymnasium.vector import AsyncVectorEnv, AutoresetMode

        self.cfg, self.num_envs, self.device = cfg, num_envs, torch.device("cpu")
        self.single: PolicyObsEnv | None = None
        if num_envs == 1:
            self.single = _make_worker_env(cfg.to_dict(), privileged)
            self.spec: PolicySpec = self.single.spec_
        else:
            fns = [partial(_make_worker_env, cfg.to_dict(), privileged) for _ in range(num_envs)]
            self.venv = AsyncVectorEnv(fns, context="spawn", autoreset_mode=AutoresetMode.DISABLED)
            self.spec = self.venv.call("__getattribute__", "spec_")[0]

    @staticmethod
    def _to_torch(obs: dict) -> dict:
        out = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in obs.items() if k != "images"}
        out["images"] = {k: torch.from_numpy(np.asarray(v)) for k, v in obs["images"].items()}
        return out

    @staticmethod
    def _batch_of_one(obs: dict) -> dict:
        out = {k: v[None] for k, v in obs.items() if k != "images"}
        out["images"] = {k: v[None] for k, v in obs["images"].items()}
        return out

    def reset(self, seeds: list[int], mask: np.ndarray | None = None) -> dict:
        if self.single is not None:
            if mask is None or bool(np.asarray(mask)[0]):
                self._last = self._batch_of_one(self.single.reset(seed=int(seeds[0]))[0])
            return self._to_torch(self._last)
        options = None if mask is None else {"reset_mask": np.asarray(mask, dtype=bool)}
        obs, _ = self.venv.reset(seed=[int(s) for s in seeds], options=options)
        return self._to_torch(obs)

    def step(self, actions: torch.Tensor) -> StepResult:
        a = actions.detach().cpu().numpy()
        if self.single is not None:
            obs, reward, terminated, truncated, info = self.single.step(a[0])
            self._last = self._batch_of_one(obs)
            obs, reward, terminated, truncated = self._last, [reward], [terminated], [truncated]
            success = [info["success"]]
        else:
            obs, reward, terminated, truncated, info = self.venv.step(a)
            success = info.get("success", np.zeros(self.num_envs, dtype=bool))
        return StepResult(
            self._to_torch(obs),
            torch.as_tensor(np.asarray(reward), dtype=torch.float32),
            torch.as_tensor(np.asarray(terminated), dtype=torch.bool),
            torch.as_tensor(np.asarray(truncated), dtype=torch.bool),
            torch.as_tensor(np.asarray(success, dtype=bool)),
        )

    def close(self) -> None:
        if self.single is not None:
            self.single.close()
        else:
            self.venv.close()


def same_seed_leaders(seeds: list[int], env_idx: Iterable[int]) -> tuple[list[int], list[int]]:
    """(members, leaders): each env of env_idx whose seed an earlier env of env_idx has, and that earlier env."""
    first: dict[int, int] = {}
    members, leaders = [], []
    for i in env_idx:
        seed = int(seeds[i])
        if seed in first:
            members.append(i)
            leaders.append(first[seed])
        else:
            first[seed] = i
    return members, leaders


def take_states(state: dict, rows: torch.Tensor) -> dict:
    """The given env rows of a ManiSkill state dict (nested dicts of [N, D] tensors)."""
    return {k: take_states(v, rows) if isinstance(v, dict) else v[rows] for k, v in state.items()}


def reset_to_states(env, states: dict, env_idx: torch.Tensor) -> dict:
    """Reset envs env_idx of a ManiSkill env to the given simulator states (one row each) and return the raw
    observation of all envs. ManiSkill resets their controllers and step counters as on a seeded reset."""
    raw, _ = env.reset(options={"env_idx": env_idx, "reset_to_env_states": {"env_states": states}})
    return raw


class GpuVecEnv:
    """ManiSkill's own batched GPU simulation (physx_cuda); needs an NVIDIA GPU.

    Its batched reset seeds one torch RNG with the first seed of the list, so envs given the same seed would
    still start apart: each such env is reset again to the exact simulator state (actors and articulations) of
    the first env with its seed. Episode data a task keeps outside the simulator is not copied.
    """

    def __init__(self, cfg: EnvConfig, num_envs: int, privileged: bool = False):
        self.cfg, self.num_envs, self.privileged = cfg, num_envs, privileged
        self.env = make_maniskill_env(cfg, num_envs=num_envs)
        raw, _ = self.env.reset(seed=list(range(num_envs)))
        self.spec = spec_from_env(cfg, self.env, raw)
        self.device = self.env.unwrapped.device
        self.with_images = cfg.obs_mode == "rgb"

    def _obs(self, raw: dict) -> dict:
        obs = adapt(raw, self.cfg.image_size, self.with_images)
        if self.privileged:
            obs["privileged"] = privileged_state(self.env)
        return obs

    def reset(self, seeds: list[int], mask: np.ndarray | None = None) -> dict:
        if mask is None:
            env_idx = list(range(self.num_envs))
            raw, _ = self.env.reset(seed=[int(s) for s in seeds])
        else:
            env_idx = np.flatnonzero(mask).tolist()
            raw, _ = self.env.reset(seed=[int(seeds[i]) for i in env_idx],
                                    options={"env_idx": torch.as_tensor(env_idx, device=self.device)})
        members, leaders = same_seed_leaders(seeds, env_idx)
        if members:
            states = take_states(self.env.unwrapped.get_state_dict(), torch.as_tensor(leaders, device=self.device))
            raw = reset_to_states(self.env, states, torch.as_tensor(members, device=self.device))
        return self._obs(raw)

    def step(self, actions: torch.Tensor) -> StepResult:
        raw, reward, terminated, truncated, info = self.env.step(actions.to(self.device))
        return StepResult(
            self._obs(raw),
            reward.float(),
            terminated.bool(),
            truncated.bool(),
            info["success"].bool(),
        )

    def close(self) -> None:
        self.env.close()


def make_vec_env(cfg: EnvConfig, num_envs: int, privileged: bool = False) -> CpuVecEnv | GpuVecEnv:
    cfg.validate()
    if cfg.sim_backend == "physx_cuda":
        return GpuVecEnv(cfg, num_envs, privileged)
    return CpuVecEnv(cfg, num_envs, privileged)
