"""Shared fixtures: small real ManiSkill datasets and checkpoints, built once per test session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def state_demos(tmp_path_factory):
    """Two real motion-planned PickCube demos in state-observation mode (cheap: no rendering)."""
    from sim_trainer.data.demos import generate_demos
    from sim_trainer.envs.spec import EnvConfig

    out = tmp_path_factory.mktemp("data") / "pickcube_state"
    generate_demos(EnvConfig(task="PickCube-v1", obs_mode="state"), 2, out)
    return out


@pytest.fixture(scope="session")
def rgb_demos(tmp_path_factory):
    """One real motion-planned PickCube demo with a 32x32 camera."""
    from sim_trainer.data.demos import generate_demos
    from sim_trainer.envs.spec import EnvConfig

    out = tmp_path_factory.mktemp("data") / "pickcube_rgb"
    generate_demos(EnvConfig(task="PickCube-v1", obs_mode="rgb", image_size=32), 1, out)
    return out


@pytest.fixture(scope="session")
def tiny_rgb_checkpoint(rgb_demos, tmp_path_factory):
    from sim_trainer.sft.trainer import SFTConfig, train_sft

    out = tmp_path_factory.mktemp("ckpt") / "tiny_rgb"
    train_sft(SFTConfig(data=[str(rgb_demos)], out=str(out), size="tiny", steps=20, batch_size=8,
                        horizon=8, exec_steps=4, num_steps=2, warmup=5, save_every=10))
    return out
