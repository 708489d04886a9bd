"""The ManiSkill environment layer, on the real simulator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from policy_runtime.contract import CameraSpec, PolicySpec
from sim_trainer.envs.spec import CameraOverride, EnvConfig
from sim_trainer.envs.tasks import TASKS, get_task
from sim_trainer.envs.vec_env import make_vec_env
from sim_trainer.errors import UserError


def test_required_tasks_have_instructions():
    for task in ("PickCube-v1", "PushCube-v1", "StackCube-v1", "PullCube-v1"):
        assert task in TASKS and len(get_task(task).instruction) > 10


def test_unknown_task_is_a_user_error():
    with pytest.raises(UserError, match="unknown task"):
        EnvConfig(task="FlyToMars-v1").validate()


def test_env_config_for_a_policy_takes_its_modes_and_image_size():
    spec = PolicySpec(task="PickCube-v1", control_mode="pd_ee_delta_pose", obs_mode="rgb",
                      cameras=(CameraSpec("base_camera", 48, 48),), state_layout=(("qpos", 9),), action_dim=7,
                      action_low=(-1.0,) * 7, action_high=(1.0,) * 7, control_hz=20.0, instruction="pick")
    cfg = EnvConfig.for_policy(spec, sim_backend="physx_cpu", max_episode_steps=5)
    assert (cfg.task, cfg.obs_mode, cfg.control_mode, cfg.image_size, cfg.horizon) == (
        "PickCube-v1", "rgb", "pd_ee_delta_pose", 48, 5)
    assert EnvConfig.for_policy(spec, "PushCube-v1").task == "PushCube-v1"
    state_only = PolicySpec(**{**spec.__dict__, "obs_mode": "state", "cameras": ()})
    assert EnvConfig.for_policy(state_only).image_size == EnvConfig().image_size
    with pytest.raises(UserError, match="unknown task"):
        EnvConfig.for_policy(spec, "FlyToMars-v1")


@pytest.mark.parametrize("task", ["PickCube-v1", "PushCube-v1", "StackCube-v1", "PullCube-v1"])
def test_state_mode_reset_step(task):
    venv = make_vec_env(EnvConfig(task=task, obs_mode="state"), 1)
    try:
        obs = venv.reset([0])
        assert obs["images"] == {}
        assert obs["state"].shape == (1, venv.spec.state_dim)
        assert venv.spec.action_dim == 8 and venv.spec.control_hz == 20
        res = venv.step(torch.zeros(1, 8))
        assert res.reward.shape == (1,) and res.success.dtype == torch.bool
        assert torch.isfinite(res.obs["state"]).all()
    finally:
        venv.close()


def test_rgb_mode_renders_at_policy_resolution_and_seeds_reproduce():
    venv = make_vec_env(EnvConfig(task="PickCube-v1", obs_mode="rgb", image_size=32), 1)
    try:
        a = venv.reset([7])
        img = a["images"]["base_camera"]
        assert img.shape == (1, 32, 32, 3) and img.dtype == torch.uint8 and img.float().std() > 5
        b = venv.reset([7])
        c = venv.reset([8])
        assert torch.equal(a["state"], b["state"]) and torch.equal(a["images"]["base_camera"],
                                                                   b["images"]["base_camera"])
        assert not torch.equal(a["state"], c["state"])
    finally:
        venv.close()


def test_ee_delta_pose_control_mode_has_its_own_action_spec():
    venv = make_vec_env(EnvConfig(task="PushCube-v1", obs_mode="state", control_mode="pd_ee_delta_pose"), 1)
    try:
        assert venv.spec.action_dim == 7  # 6-D delta pose + gripper
        assert venv.spec.action_low == (-1.0,) * 7
        venv.reset([0])
        venv.step(torch.zeros(1, 7))
    finally:
        venv.close()


def test_episode_truncates_at_the_horizon():
    venv = make_vec_env(EnvConfig(task="PushCube-v1", obs_mode="state", max_episode_steps=5), 1)
    try:
        venv.reset([0])
        flags = [bool(venv.step(torch.zeros(1, 8)).truncated[0]) for _ in range(5)]
        assert flags == [False] * 4 + [True]
    finally:
        venv.close()


def test_camera_override_moves_the_camera():
    base = EnvConfig(task="PickCube-v1", obs_mode="rgb", image_size=32)
    moved = EnvConfig(task="PickCube-v1", obs_mode="rgb", image_size=32, cameras={
        "base_camera": CameraOverride(pose=[0.5, 0.3, 0.5, 0.0, 0.3826834, 0.0, -0.9238795],
                                      intrinsic=[[30.0, 0, 16], [0, 30.0, 16], [0, 0, 1]])})
    frames = []
    for cfg in (base, moved):
        venv = make_vec_env(cfg, 1)
        try:
            frames.append(venv.reset([0])["images"]["base_camera"].float())
        finally:
            venv.close()
    assert (frames[0] - frames[1]).abs().mean() > 10


def test_spawned_workers_step_in_parallel():
    venv = make_vec_env(EnvConfig(task="PushCube-v1", obs_mode="state"), 2)
    try:
        obs = venv.reset([0, 1])
        assert obs["state"].shape[0] == 2 and not torch.equal(obs["state"][0], obs["state"][1])
        res = venv.step(torch.zeros(2, 8))
        assert res.reward.shape == (2,)
        # partial reset: only env 1 goes back to a seed
        again = venv.reset([0, 1], mask=np.array([False, True]))
        assert torch.equal(again["state"][1], obs["state"][1])
    finally:
        venv.close()
