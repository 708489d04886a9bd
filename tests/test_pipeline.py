"""Demos -> SFT -> evaluation on the real simulator, at tiny sizes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from policy_runtime.episodes import dataset_spec, load_dataset
from policy_runtime.stats import wilson_interval
from sim_trainer.envs.spec import EnvConfig
from sim_trainer.errors import UserError
from sim_trainer.evaluate.report import write_report
from sim_trainer.evaluate.rollout import evaluate
from sim_trainer.models.checkpoint import load_checkpoint
from sim_trainer.policy import ChunkPolicy
from sim_trainer.sft.trainer import SFTConfig, train_sft


def test_motion_planned_demos_are_successful_and_in_bounds(state_demos, rgb_demos):
    spec = dataset_spec(state_demos)
    assert spec.obs_mode == "state" and spec.cameras == ()
    for ep in load_dataset(state_demos):
        assert ep.success and ep.source == "sim" and ep.task == "PickCube-v1"
        assert np.abs(ep.actions).max() <= 1.0 + 1e-6
        assert ep.state.shape == (len(ep), spec.state_dim) and "seed" in ep.provenance
    (ep,) = load_dataset(rgb_demos)
    assert ep.images["base_camera"].shape == (len(ep), 32, 32, 3)


def test_demo_generation_refuses_a_non_empty_output(state_demos):
    from sim_trainer.data.demos import generate_demos

    with pytest.raises(UserError, match="already holds episodes"):
        generate_demos(EnvConfig(task="PickCube-v1", obs_mode="state"), 1, state_demos)


def test_resumed_sft_equals_an_uninterrupted_run(state_demos, tmp_path, monkeypatch):
    import sim_trainer.sft.trainer as trainer

    cfg = dict(data=[str(state_demos)], size="tiny", batch_size=8, horizon=8, exec_steps=4, warmup=3,
               save_every=5, steps=10)
    train_sft(SFTConfig(out=str(tmp_path / "straight"), **cfg))

    save_state = trainer._save_trainer_state

    def save_then_die(*args, **kwargs):  # the process is killed right after its step-5 checkpoint
        save_state(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_save_trainer_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_sft(SFTConfig(out=str(tmp_path / "resumed"), **cfg))
    monkeypatch.setattr(trainer, "_save_trainer_state", save_state)
    with pytest.raises(UserError, match="--resume"):
        train_sft(SFTConfig(out=str(tmp_path / "resumed"), **cfg))
    train_sft(SFTConfig(out=str(tmp_path / "resumed"), resume=True, **cfg))

    a = load_file(str(tmp_path / "straight" / "trainer_state.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "trainer_state.safetensors"))
    for k in a:
        if k.startswith(("weights/", "ema/")):
            assert np.allclose(a[k].numpy(), b[k].numpy(), atol=1e-6), k
    assert json.loads((tmp_path / "resumed" / "trainer_state.json").read_text())["step"] == 10
    assert list((tmp_path / "straight" / "tb").glob("events.*"))


def test_mixed_datasets_must_share_a_spec(state_demos, rgb_demos, tmp_path):
    with pytest.raises(UserError, match="does not match"):
        train_sft(SFTConfig(data=[str(state_demos), str(rgb_demos)], out=str(tmp_path / "x"), size="tiny", steps=1))


def test_evaluation_reports_success_with_interval_and_video(tiny_rgb_checkpoint, tmp_path):
    loaded = load_checkpoint(tiny_rgb_checkpoint)
    policy = ChunkPolicy(loaded.model, loaded.spec)
    cfg = EnvConfig(task="PickCube-v1", obs_mode="rgb", image_size=32, max_episode_steps=8)
    result = evaluate(policy, cfg, episodes=2, num_envs=1, seed_start=500, progress=False)
    s = result.summary()
    assert s["episodes"] == 2 and s["seeds"] == [500, 501] and s["horizon"] == 8
    assert 0.0 <= s["success_once_wilson95"][0] <= s["success_once"] <= s["success_once_wilson95"][1] <= 1.0
    paths = write_report(result, tmp_path / "eval", str(tiny_rgb_checkpoint), 20.0)
    assert json.loads(Path(paths["json"]).read_text())["summary"]["episodes"] == 2
    assert Path(paths["video"]).read_bytes()[:3] == b"GIF"
    assert len(result.frames) == 8


def test_wilson_interval():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and 0.25 < hi < 0.35
    lo, hi = wilson_interval(50, 100)
    assert abs(lo - 0.404) < 0.002 and abs(hi - 0.596) < 0.002
