"""Vectorised environments with one interface for both simulator backends.

- physx_cpu: one ManiSkill env per spawned process (gymnasium AsyncVectorEnv; the fork context hangs).
- physx_cuda: many envs in one process, batched on the GPU by ManiSkill itself.

No auto-reset: the caller resets whichever envs it wants with the seeds it wants, so evaluation seeds
are explicit and reproducible. Everything is returned as torch tensors on `self.device`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from sim_trainer.envs.adapter import adapt
from sim_trainer.envs.make import PolicyObsEnv, make_maniskill_env, spec_from_env
from sim_trainer.envs.spec import EnvConfig, PolicySpec


@dataclass
class StepResult:
    obs: dict
    reward: torch.Tensor  # [N] float32
    terminated: torch.Tensor  # [N] bool
    truncated: torch.Tensor  # [N] bool
    success: torch.Tensor  # [N] bool


def _make_worker_env(cfg_dict: dict) -> PolicyObsEnv:
    return PolicyObsEnv(EnvConfig.from_dict(cfg_dict))


class CpuVecEnv:
    """One ManiSkill env per spawned process; a single env runs in this process.

    Envs may be stepped past their episode's end (evaluation ignores terminations, RL masks what follows):
    gymnasium's SyncVectorEnv refuses that when autoreset is disabled, so the single env is stepped directly.
    """

    def __init__(self, cfg: EnvConfig, num_envs: int):
        from gymnasium.vector import AsyncVectorEnv, AutoresetMode

        self.cfg, self.num_envs, self.device = cfg, num_envs, torch.device("cpu")
        self.single: PolicyObsEnv | None = None
        if num_envs == 1:
            self.single = _make_worker_env(cfg.to_dict())
            self.spec: PolicySpec = self.single.spec_
        else:
            fns = [partial(_make_worker_env, cfg.to_dict()) for _ in range(num_envs)]
            self.venv = AsyncVectorEnv(fns, context="spawn", autoreset_mode=AutoresetMode.DISABLED)
            self.spec = self.venv.call("__getattribute__", "spec_")[0]

    @staticmethod
    def _to_torch(obs: dict) -> dict:
        return {
            "state": torch.from_numpy(np.asarray(obs["state"], dtype=np.float32)),
            "images": {k: torch.from_numpy(np.asarray(v)) for k, v in obs["images"].items()},
        }

    @staticmethod
    def _batch_of_one(obs: dict) -> dict:
        return {"state": obs["state"][None], "images": {k: v[None] for k, v in obs["images"].items()}}

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


class GpuVecEnv:
    """ManiSkill's own batched GPU simulation (physx_cuda); needs an NVIDIA GPU."""

    def __init__(self, cfg: EnvConfig, num_envs: int):
        self.cfg, self.num_envs = cfg, num_envs
        self.env = make_maniskill_env(cfg, num_envs=num_envs)
        raw, _ = self.env.reset(seed=list(range(num_envs)))
        self.spec = spec_from_env(cfg, self.env, raw)
        self.device = self.env.unwrapped.device
        self.with_images = cfg.obs_mode == "rgb"

    def reset(self, seeds: list[int], mask: np.ndarray | None = None) -> dict:
        if mask is None:
            raw, _ = self.env.reset(seed=[int(s) for s in seeds])
        else:
            idx = torch.as_tensor(np.flatnonzero(mask), device=self.device)
            raw, _ = self.env.reset(seed=[int(seeds[i]) for i in idx.tolist()], options={"env_idx": idx})
        return adapt(raw, self.cfg.image_size, self.with_images)

    def step(self, actions: torch.Tensor) -> StepResult:
        raw, reward, terminated, truncated, info = self.env.step(actions.to(self.device))
        return StepResult(
            adapt(raw, self.cfg.image_size, self.with_images),
            reward.float(),
            terminated.bool(),
            truncated.bool(),
            info["success"].bool(),
        )

    def close(self) -> None:
        self.env.close()


def make_vec_env(cfg: EnvConfig, num_envs: int) -> CpuVecEnv | GpuVecEnv:
    cfg.validate()
    if cfg.sim_backend == "physx_cuda":
        return GpuVecEnv(cfg, num_envs)
    return CpuVecEnv(cfg, num_envs)
