"""The one backbone interface (models/interface.py): our small model implements it, and trainers freeze by group."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sim_trainer.data.normalize import NormStats, Stats
from sim_trainer.errors import UserError
from sim_trainer.models.config import ModelConfig
from sim_trainer.models.flow_vla import FlowVLA
from sim_trainer.models.interface import FlowPolicy, PrefixCache, check_groups_cover, freeze_groups
from sim_trainer.models.tokenizer import tokenize_batch
from sim_trainer.rl.config import RLConfig
from sim_trainer.rl.policy import RLPolicy, SamplerSettings
from sim_trainer.rl.trainer import _set_trainable


def make_model(shortcut: bool = False) -> FlowVLA:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = ModelConfig.from_size("tiny", camera_names=("cam",), image_size=16, state_dim=3, action_dim=2, horizon=4,
                                exec_steps=2, num_steps=2, shortcut=shortcut)
    return FlowVLA(cfg, NormStats(Stats.of(rng.normal(size=(20, 3))), Stats.of(rng.normal(size=(20, 2)))))


@pytest.mark.parametrize("shortcut", [False, True])
def test_flow_vla_implements_the_interface_and_every_parameter_has_one_group(shortcut):
    model = make_model(shortcut)
    assert isinstance(model, FlowPolicy)
    groups = model.parameter_groups()
    check_groups_cover(model, groups)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].startswith("cameras.") for p in groups["vision"]) and groups["vision"]
    expert = {names[id(p)].split(".")[0] for p in groups["expert"]}
    # the step-size embedding of a shortcut model belongs to the action expert (it trains under --expert-only)
    assert expert == {"action_in", "time_mlp", "action_pos", "expert", "expert_ln", "action_out"} | (
        {"step_mlp"} if shortcut else set())


def test_interface_calls_have_the_documented_shapes():
    model = make_model()
    b = 3
    text = model.tokenize(["push the cube"] * b)
    assert torch.equal(text, tokenize_batch(["push the cube"] * b, model.cfg.max_text_len))
    images = {"cam": torch.randint(0, 256, (b, 16, 16, 3), dtype=torch.uint8)}
    state = torch.randn(b, 3)
    cache = model.encode_prefix(images, state, text)
    assert isinstance(cache, PrefixCache) and cache.pooled.shape == (b, model.pooled_dim)
    x, tau = torch.randn(b, 4, 2), torch.full((b,), 0.5)
    v, feats = model.expert_forward(cache, x, tau)
    assert v.shape == (b, 4, 2) and feats.shape == (b, 4, model.feature_dim)
    assert torch.equal(model.velocity(cache, x, tau), v)
    rep = cache.repeat(2)
    assert torch.equal(model.velocity(rep, x.repeat_interleave(2, 0), tau.repeat_interleave(2, 0))[::2], v)
    assert model.sample_actions(images, state, text, torch.randn(b, 4, 2)).shape == (b, 4, 2)
    assert model.flow_matching_loss(images, state, text, torch.randn(b, 4, 2)).ndim == 0


def test_freeze_groups_by_name_and_refuses_an_unknown_group():
    model = make_model()
    groups = model.parameter_groups()
    freeze_groups(groups, ["vision"])
    assert not any(p.requires_grad for p in groups["vision"])
    assert all(p.requires_grad for g in ("language", "expert") for p in groups[g])
    freeze_groups(groups, [])
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(UserError, match="unknown parameter group.*'lm'.*vision, language, expert, heads"):
        freeze_groups(groups, ["lm"])


@pytest.mark.parametrize("flags, trainable", [({}, {"vision", "language", "expert"}),
                                              ({"freeze_vision": True}, {"language", "expert"}),
                                              ({"expert_only": True}, {"expert"})])
def test_rl_freezing_options_act_on_the_backbones_groups_and_heads_always_train(flags, trainable):
    model = make_model()
    policy = RLPolicy(model, SamplerSettings(num_steps=2), "prefix", -torch.ones(2), torch.ones(2))
    _set_trainable(policy, RLConfig(ckpt="x", **flags))
    groups = model.parameter_groups()
    assert {g for g, ps in groups.items() if all(p.requires_grad for p in ps)} == trainable
    assert {g for g, ps in groups.items() if not any(p.requires_grad for p in ps)} == set(groups) - trainable
    assert all(p.requires_grad for p in policy.noise_head.parameters())
    assert all(p.requires_grad for p in policy.value_head.parameters())
