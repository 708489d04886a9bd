"""--precision bf16 (autocast around the forward passes, fp32 master weights, losses and log-probs) and
--frozen-dtype bf16 (frozen groups stored in bf16) on the tiny pi0 / pi0.5, on CPU (CPU autocast supports bf16).

Measured on CPU: the tiny models' flow-matching loss under bf16 autocast is within 7.5e-4 (relative) of fp32's on
the same batch, noise and flow times; the SFT losses of a run's first 3 steps within 4e-4."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sim_trainer.data.normalize import NormStats, Stats
from sim_trainer.models.backbones import tiny_backbone
from sim_trainer.models.checkpoint import load_checkpoint
from sim_trainer.models.interface import freeze_groups
from sim_trainer.models.precision import autocast, store_frozen
from sim_trainer.rl.config import RLConfig
from sim_trainer.rl.learner import Learner
from sim_trainer.rl.policy import RLPolicy, SamplerSettings
from sim_trainer.rl.rollout import Collector
from sim_trainer.sft.trainer import EMA
from tests.bad_input import run_cli
from tests.test_rl import TargetTask
from tests.test_vla_pipeline import ACTION_DIM, INSTRUCTION, STATE_DIM, _ok, batch, norm_stats

FROZEN = ("vision", "language")
LOSS_RTOL = 5e-3  # one loss, same inputs: measured 7.5e-4 (pi0-tiny) and 3.5e-4 (pi05-tiny)
SFT_LOSS_RTOL = 5e-3  # a run's first 3 steps (the weights drift apart step by step): measured <= 4e-4


def _tiny(name: str):
    return tiny_backbone(name, ("base_camera",), STATE_DIM, ACTION_DIM, 8, 4, 2, norm_stats())


@pytest.mark.parametrize("name", ["pi0-tiny", "pi05-tiny"])
def test_bf16_flow_matching_loss_is_fp32_and_close_to_the_fp32_loss(name):
    model = _tiny(name).train()
    images, state, actions = batch(4)
    text = model.tokenize([INSTRUCTION] * 4)
    noise, tau = torch.randn(actions.shape, generator=torch.Generator().manual_seed(3)), torch.rand(4)
    want = model.flow_matching_loss(images, state, text, actions, noise=noise, tau=tau)
    with autocast("bf16", "cpu"):
        got = model.flow_matching_loss(images, state, text, actions, noise=noise, tau=tau)
        cache = model.encode_prefix(images, state, text)
    assert cache.kv[0][0].dtype == torch.bfloat16  # the forward pass really ran in bf16
    assert got.dtype == torch.float32 and math.isfinite(got.item()) and got.item() != want.item()
    assert abs(got.item() - want.item()) <= LOSS_RTOL * want.item()
    got.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", ["pi0-tiny", "pi05-tiny"])
def test_frozen_groups_are_stored_in_bf16_trained_in_fp32_and_saved_in_fp32(name, tmp_path):
    from sim_trainer.models.checkpoint import save_checkpoint
    from tests.test_vla_pipeline import spec

    model = _tiny(name).train()
    groups = model.parameter_groups()
    freeze_groups(groups, FROZEN)
    frozen_numel = sum(p.numel() for g in FROZEN for p in groups[g])
    assert store_frozen(groups, FROZEN, "bf16") == frozen_numel
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for g in FROZEN for p in groups[g])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    images, state, actions = batch(2)
    with autocast("bf16", "cpu"):
        loss = model.flow_matching_loss(images, state, model.tokenize([INSTRUCTION] * 2), actions)
    loss.backward()
    opt.step()
    assert all(v.dtype == torch.float32 for st in opt.state.values() for v in st.values() if v.is_floating_point())
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if not p.requires_grad)
    ema = EMA(model, 0.999)  # SFT's: a bf16 frozen weight is copied, not averaged in bf16 (which drifts)
    for step in range(20):
        ema.update(model, step)
    assert all(torch.equal(ema.shadow[n], v) for n, v in frozen_before.items())

    save_checkpoint(tmp_path / "ckpt", model, spec(), norm_stats())
    saved = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert {v.dtype for v in saved.values() if v.is_floating_point()} == {torch.float32}
    loaded = load_checkpoint(tmp_path / "ckpt").model
    for k, v in model.state_dict().items():  # the bf16 values, exactly, in fp32
        assert torch.equal(loaded.state_dict()[k], v.float()), k


@pytest.mark.parametrize("name", ["pi0-tiny", "pi05-tiny"])
@pytest.mark.parametrize("algorithm,method", [("ppo", "flow_noise"), ("grpo", "flow_sde")])
def test_the_ratio_is_exactly_one_on_the_first_minibatch_under_bf16(name, algorithm, method):
    """Rollout and update run the model under bf16 autocast with the frozen prefix in bf16; the transition's mean
    and std and every log-density are fp32, so the learner's first minibatch reproduces the behaviour log-probs."""
    torch.manual_seed(0)
    model = tiny_backbone(name, (), 3, 2, 2, 1, 2, NormStats(Stats.of(np.eye(3)), Stats.of(np.eye(2))))
    policy = RLPolicy(model, SamplerSettings(method, 2, "mixed"), "prefix", -torch.ones(2), torch.ones(2),
                      precision="bf16")
    groups = model.parameter_groups()
    freeze_groups(groups, FROZEN)
    store_frozen(groups, FROZEN, "bf16")
    text = model.tokenize(["reach the target"])
    cfg = RLConfig(algorithm=algorithm, noise=method, epochs=2, minibatch=8, group_size=4, grpo_filter=False,
                   precision="bf16", frozen_dtype="bf16", expert_only=True)
    env = TargetTask(8, (0.6, -0.4))
    collector = Collector(env, policy, text, exec_steps=1, gamma=0.99, episodic=algorithm == "grpo", group_size=4)
    learner = Learner(policy, cfg, text, exec_steps=1)
    policy.eval()
    rollout = collector.collect(2 if algorithm == "ppo" else 1, np.random.default_rng(0),
                                torch.Generator().manual_seed(0))
    assert rollout.log_probs.dtype == rollout.chains.dtype == rollout.values.dtype == torch.float32
    # the expert really runs in bf16: its fp32 velocity differs from the one computed without autocast
    obs = env.reset([0])
    cache = policy.encode(obs, text)
    x, tau = torch.randn(8, 2, 2), torch.ones(8)
    v_bf16 = policy.expert(cache, x, tau)[0]
    assert v_bf16.dtype == torch.float32 and not torch.equal(v_bf16, model.expert_forward(cache, x, tau)[0])
    policy.train()
    metrics = learner.learn(rollout, torch.Generator().manual_seed(1), 0)
    assert metrics["first_ratio_max_dev"] == 0.0
    assert math.isfinite(metrics["policy_loss"])


def _sft_losses(out) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    return [e.value for e in events.Scalars("sft/loss")]


def test_bf16_sft_tracks_fp32_then_bf16_rl_and_eval_on_maniskill(state_demos, tmp_path):
    """The same tiny pi0.5 SFT in fp32 and in bf16 (expert only, the frozen prefix in bf16): finite losses close to
    fp32's and an fp32 checkpoint; PPO from it in bf16 (real ManiSkill, CLI) keeps the first-minibatch ratio at 1
    and writes an fp32 checkpoint, which `sim-trainer eval` runs under bf16 autocast."""
    from sim_trainer.sft.trainer import SFTConfig, train_sft

    common = dict(data=[str(state_demos)], backbone="pi05-tiny", expert_only=True, steps=3, batch_size=4, horizon=8,
                  exec_steps=4, num_steps=2, warmup=1, log_every=1, save_every=3)
    train_sft(SFTConfig(out=str(tmp_path / "fp32"), **common))
    out = train_sft(SFTConfig(out=str(tmp_path / "bf16"), precision="bf16", frozen_dtype="bf16", **common))
    want, got = _sft_losses(tmp_path / "fp32"), _sft_losses(out)
    assert len(got) == 3 and all(math.isfinite(v) for v in got) and got != want
    assert all(abs(g - w) <= SFT_LOSS_RTOL * w for g, w in zip(got, want, strict=True)), (got, want)
    saved = load_file(str(out / "model.safetensors"))
    assert {v.dtype for v in saved.values() if v.is_floating_point()} == {torch.float32}
    _ok(run_cli("sim-trainer", ["rl", "--ckpt", out, "--out", tmp_path / "ppo", "--precision", "bf16",
                                "--frozen-dtype", "bf16", "--expert-only", "--num-envs", "2", "--rollout-chunks", "2",
                                "--max-episode-steps", "8", "--minibatch", "4", "--epochs", "1", "--eval-episodes", "1",
                                "--eval-envs", "1", "--num-steps", "2", "--threads", "1", "--total-env-steps", "16"]))
    updates = [json.loads(r) for r in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert all(u["first_ratio_max_dev"] == 0.0 for u in updates if "eval" not in u)
    saved = load_file(str(tmp_path / "ppo" / "model.safetensors"))
    assert {v.dtype for v in saved.values() if v.is_floating_point()} == {torch.float32}
    _ok(run_cli("sim-trainer", ["eval", "--ckpt", tmp_path / "ppo", "--precision", "bf16", "--episodes", "1",
                                "--envs", "1", "--max-steps", "8", "--out", tmp_path / "eval", "--threads", "1"]))
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["summary"]["episodes"] == 1
