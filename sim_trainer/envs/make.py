"""Build ManiSkill environments from an EnvConfig, and read the PolicySpec they imply."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch

from policy_runtime.contract import CameraSpec, PolicySpec
from sim_trainer.envs.adapter import adapt, state_layout
from sim_trainer.envs.domain import load_domain, make_shifted_env
from sim_trainer.envs.spec import EnvConfig
from sim_trainer.envs.tasks import get_task


def make_maniskill_env(cfg: EnvConfig, num_envs: int = 1, control_mode: str | None = None,
                       obs_mode: str | None = None, max_episode_steps: int | None = None) -> gym.Env:
    """The raw ManiSkill env (batched torch observations), configured from cfg (in cfg.domain if one is set)."""
    import mani_skill.envs  # noqa: F401  (registers the tasks)

    sensor_configs: dict = {"width": cfg.image_size, "height": cfg.image_size}
    for name, override in cfg.cameras.items():
        sensor_configs[name] = override.to_sensor_config()
    ms_obs_mode = obs_mode or ("rgb" if cfg.obs_mode == "rgb" else "state_dict")
    kwargs = dict(
        num_envs=num_envs,
        obs_mode=ms_obs_mode,
        control_mode=control_mode or cfg.control_mode,
        reward_mode=cfg.reward_mode,
        sim_backend=cfg.sim_backend,
        render_backend="gpu" if cfg.sim_backend == "physx_cuda" else "cpu",
        sensor_configs=sensor_configs,
        max_episode_steps=max_episode_steps or cfg.horizon,
    )
    if cfg.domain is None:
        return gym.make(cfg.task, **kwargs)
    return make_shifted_env(cfg.task, load_domain(cfg.domain), **kwargs)


def privileged_state(env: gym.Env) -> torch.Tensor:
    """The simulator's true low-dimensional state of every env, float32 [N, P], whatever the env renders.

    Exactly what ManiSkill returns with obs_mode="state" (agent qpos/qvel, then the task's extras, object and goal
    poses included): a privileged critic reads it in simulation. ManiSkill 3.0 builds the observation from
    `_obs_mode` and `obs_mode_struct` (an RGB env leaves the object poses out), so both are switched to "state"
    for this one call.
    """
    from mani_skill.envs.utils.observations import parse_obs_mode_to_struct

    base = env.unwrapped
    saved = base._obs_mode, base.obs_mode_struct
    base._obs_mode, base.obs_mode_struct = "state", parse_obs_mode_to_struct("state")
    try:
        return base.get_obs().float()
    finally:
        base._obs_mode, base.obs_mode_struct = saved


def spec_from_env(cfg: EnvConfig, env: gym.Env, raw_obs: dict) -> PolicySpec:
    space = env.unwrapped.single_action_space
    cams = ()
    if cfg.obs_mode == "rgb":
        cams = tuple(CameraSpec(name, cfg.image_size, cfg.image_size) for name in raw_obs["sensor_data"])
    return PolicySpec(
        task=cfg.task,
        control_mode=cfg.control_mode,
        obs_mode=cfg.obs_mode,
        cameras=cams,
        state_layout=state_layout(raw_obs),
        action_dim=int(space.shape[0]),
        action_low=tuple(float(x) for x in np.broadcast_to(space.low, space.shape)),
        action_high=tuple(float(x) for x in np.broadcast_to(space.high, space.shape)),
        control_hz=float(env.unwrapped.control_freq),
        instruction=get_task(cfg.task).instruction,
    )


def probe_spec(cfg: EnvConfig) -> PolicySpec:
    """The PolicySpec of a task configuration (builds one CPU env for a moment)."""
    from dataclasses import replace

    probe_cfg = replace(cfg, sim_backend="physx_cpu")
    env = make_maniskill_env(probe_cfg)
    try:
        raw, _ = env.reset(seed=0)
        return spec_from_env(probe_cfg, env, raw)
    finally:
        env.close()


class PolicyObsEnv(gym.Env):
    """One CPU ManiSkill env with numpy observations in the policy's layout (for vector-env workers).

    With `privileged`, every observation also carries "privileged": privileged_state() at the same step.
    """

    def __init__(self, cfg: EnvConfig, privileged: bool = False):
        self.cfg = cfg.validate()
        self.env = make_maniskill_env(cfg)
        raw, _ = self.env.reset(seed=0)
        self.spec_ = spec_from_env(cfg, self.env, raw)
        self.with_images, self.privileged = cfg.obs_mode == "rgb", privileged
        images = {
            c.name: gym.spaces.Box(0, 255, (c.height, c.width, 3), np.uint8) for c in self.spec_.cameras
        }
        spaces = {
            "state": gym.spaces.Box(-np.inf, np.inf, (self.spec_.state_dim,), np.float32),
            "images": gym.spaces.Dict(images),
        }
        if privileged:
            spaces["privileged"] = gym.spaces.Box(-np.inf, np.inf, privileged_state(self.env).shape[1:], np.float32)
        self.observation_space = gym.spaces.Dict(spaces)
        self.action_space = self.env.unwrapped.single_action_space

    def _obs(self, raw: dict) -> dict:
        obs = adapt(raw, self.cfg.image_size, self.with_images)
        out = {
            "state": obs["state"][0].numpy(),
            "images": {k: v[0].numpy() for k, v in obs["images"].items()},
        }
        if self.privileged:
            out["privileged"] = privileged_state(self.env)[0].numpy()
        return out

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        raw, info = self.env.reset(seed=seed, options=options)
        return self._obs(raw), {}

    def step(self, action):
        raw, reward, terminated, truncated, info = self.env.step(action)
        out_info = {"success": bool(info["success"][0]) if "success" in info else False}
        return (self._obs(raw), float(reward[0]), bool(terminated[0]), bool(truncated[0]), out_info)

    def close(self):
        self.env.close()
