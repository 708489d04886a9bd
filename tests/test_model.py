"""The flow VLA: shapes, the flow-matching objective, deterministic sampling, checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from policy_runtime.contract import CameraSpec, PolicySpec
from sim_trainer.data.normalize import NormStats, Stats
from sim_trainer.errors import UserError
from sim_trainer.models.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from sim_trainer.models.config import ModelConfig
from sim_trainer.models.flow import interpolate, time_grid
from sim_trainer.models.flow_vla import FlowVLA
from sim_trainer.models.tokenizer import PAD, tokenize, tokenize_batch

B, H, A, S, IMG = 4, 8, 3, 5, 32


def make_model(seed: int = 0, size: str = "tiny") -> FlowVLA:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    cfg = ModelConfig.from_size(size, camera_names=("cam",), image_size=IMG, state_dim=S, action_dim=A, horizon=H,
                                exec_steps=4, num_steps=4)
    return FlowVLA(cfg, NormStats(Stats.of(rng.normal(size=(50, S))), Stats.of(rng.normal(size=(50, A)))))


def make_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = {"cam": torch.randint(0, 256, (B, IMG, IMG, 3), generator=g, dtype=torch.uint8)}
    return images, torch.randn(B, S, generator=g), tokenize_batch(["pick up the cube"] * B, 48)


def make_spec() -> PolicySpec:
    return PolicySpec(task="PickCube-v1", control_mode="pd_joint_delta_pos", obs_mode="rgb",
                      cameras=(CameraSpec("cam", IMG, IMG),), state_layout=(("agent/qpos", S),), action_dim=A,
                      action_low=(-1.0,) * A, action_high=(1.0,) * A, control_hz=20.0, instruction="pick up the cube")


def test_size_tiny_is_well_under_two_million_parameters():
    assert make_model().num_parameters() < 2_000_000


def test_time_grid_follows_openpi_convention():
    assert torch.allclose(time_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25]))
    assert torch.allclose(time_grid(1), torch.tensor([1.0]))
    a, e = torch.zeros(2, 3), torch.ones(2, 3)
    x, u = interpolate(a, e, torch.tensor([1.0, 0.0]))
    assert torch.equal(x[0], e[0]) and torch.equal(x[1], a[1]) and torch.equal(u, e - a)
    with pytest.raises(ValueError):
        time_grid(0)


def test_tokenizer_is_byte_level_and_padded():
    t = tokenize("hé", 8)
    assert t.tolist()[:4] == [1, ord("h") + 2, 0xC3 + 2, 0xA9 + 2] and (t[4:] == PAD).all()
    assert tokenize("x" * 100, 8).shape == (8,)


@pytest.mark.parametrize("text", ["", "push the cube", "grüß dich, 机器人 🤖", "x" * 100, "a\u00e9" * 30])
def test_one_tokenizer_gives_the_same_tokens_to_the_trainer_and_the_runtime(text):
    """The trainer's tensors and the runtime's arrays are the contract's tokens: BOS, byte + 2, PAD, truncated."""
    from policy_runtime.contract import tokenize as tokenize_np

    for max_len in (2, 16, 48):
        rule = ([1] + [b + 2 for b in text.encode("utf-8")])[:max_len]
        rule += [0] * (max_len - len(rule))
        assert tokenize_np(text, max_len).tolist() == rule and tokenize_np(text, max_len).dtype == np.int64
        assert tokenize(text, max_len).tolist() == rule and tokenize(text, max_len).dtype == torch.long


def test_forward_backward_shapes_and_hooks():
    model = make_model()
    images, state, text = make_inputs()
    cache = model.encode_prefix(images, state, text)
    assert cache.pooled.shape == (B, model.cfg.d_model) and len(cache.kv) == model.cfg.expert_layers
    v, feats = model.expert_forward(cache, torch.randn(B, H, A), torch.rand(B))
    assert v.shape == (B, H, A) and feats.shape == (B, H, model.cfg.d_model)
    loss = model.flow_matching_loss(images, state, text, torch.randn(B, H, A))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_padded_chunk_steps_carry_no_loss():
    model = make_model()
    images, state, text = make_inputs()
    actions, noise, tau = torch.randn(B, H, A), torch.randn(B, H, A), torch.rand(B)
    valid = torch.ones(B, H, dtype=torch.bool)
    valid[:, H // 2:] = False
    loss = model.flow_matching_loss(images, state, text, actions, valid=valid, noise=noise, tau=tau)
    a = model.action_norm(actions)
    x_tau, target = interpolate(a, noise, tau)
    err = (model.velocity(model.encode_prefix(images, state, text), x_tau, tau) - target).pow(2).mean(-1)
    assert torch.allclose(loss, err[:, : H // 2].mean())


def test_flow_matching_loss_falls_on_a_tiny_dataset():
    model = make_model()
    images, state, text = make_inputs()
    actions = torch.randn(B, H, A)
    probe = torch.Generator().manual_seed(1)
    probe_noise, probe_tau = torch.randn(B, H, A, generator=probe), torch.rand(B, generator=probe)

    def probe_loss() -> float:
        with torch.no_grad():
            return model.flow_matching_loss(images, state, text, actions, noise=probe_noise, tau=probe_tau).item()

    before = probe_loss()
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        loss = model.flow_matching_loss(images, state, text, actions, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert probe_loss() < 0.5 * before


def test_sampling_is_deterministic_for_fixed_noise_and_depends_on_it():
    model = make_model().eval()
    images, state, text = make_inputs()
    noise = torch.randn(B, H, A)
    with torch.no_grad():
        a = model.sample_actions(images, state, text, noise, 4)
        b = model.sample_actions(images, state, text, noise.clone(), 4)
        c = model.sample_actions(images, state, text, noise + 1.0, 4)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_one_euler_step_is_noise_minus_velocity():
    model = make_model().eval()
    images, state, text = make_inputs()
    noise = torch.randn(B, H, A)
    with torch.no_grad():
        cache = model.encode_prefix(images, state, text)
        expected = noise - model.velocity(cache, noise, torch.ones(B))
        assert torch.allclose(model.denoise(cache, noise, 1), expected)


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    model = make_model().eval()
    spec = make_spec()
    rng = np.random.default_rng(0)
    norm = NormStats(Stats.of(rng.normal(size=(50, S))), Stats.of(rng.normal(size=(50, A))))
    model = FlowVLA(model.cfg, norm).eval()
    save_checkpoint(tmp_path / "ck", model, spec, norm, {"note": "test"})
    loaded = load_checkpoint(tmp_path / "ck")
    images, state, text = make_inputs()
    noise = torch.randn(B, H, A)
    with torch.no_grad():
        assert torch.equal(model.sample_actions(images, state, text, noise, 3),
                           loaded.model.sample_actions(images, state, text, noise, 3))
    assert loaded.spec == spec and loaded.info == {"note": "test"}
    assert not any(p.suffix == ".pkl" or p.suffix == ".pt" for p in (tmp_path / "ck").iterdir())


def test_corrupt_or_incomplete_checkpoints_are_user_errors(tmp_path):
    model = make_model()
    spec = make_spec()
    save_checkpoint(tmp_path / "ck", model, spec, NormStats(Stats.of(np.ones((2, S))), Stats.of(np.ones((2, A)))))
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").unlink()
    with pytest.raises(UserError, match="model.safetensors is missing"):
        load_checkpoint(tmp_path / "ck")
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    save_checkpoint(tmp_path / "ck2", model, spec, NormStats(Stats.of(np.ones((2, S))), Stats.of(np.ones((2, A)))))
    cfg = json.loads((tmp_path / "ck2" / "config.json").read_text())
    cfg["model"]["d_model"] = 64
    (tmp_path / "ck2" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="do not match"):
        load_checkpoint(tmp_path / "ck2")


def test_spec_mismatch_names_every_difference():
    spec = make_spec()
    other = PolicySpec(**{**spec.__dict__, "action_dim": 7, "control_mode": "pd_ee_delta_pose", "task": "PushCube-v1"})
    with pytest.raises(UserError) as e:
        check_compatible(spec, other, "ck")
    assert "action_dim" in str(e.value) and "control_mode" in str(e.value)
    check_compatible(spec, PolicySpec(**{**spec.__dict__, "task": "PushCube-v1"}), "ck")  # task may differ


def test_bad_model_configs_are_user_errors():
    with pytest.raises(UserError, match="unknown model size"):
        ModelConfig.from_size("huge", camera_names=(), image_size=0, state_dim=1, action_dim=1)
    with pytest.raises(UserError, match="cannot exceed"):
        ModelConfig.from_size("tiny", camera_names=(), image_size=0, state_dim=1, action_dim=1, horizon=4,
                              exec_steps=8)
    with pytest.raises(UserError, match=">= 1"):
        ModelConfig.from_size("tiny", camera_names=(), image_size=0, state_dim=1, action_dim=1, num_steps=0)


def test_image_grid_sets_the_number_of_camera_tokens():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    norm = NormStats(Stats.of(rng.normal(size=(50, S))), Stats.of(rng.normal(size=(50, A))))
    cfg = ModelConfig.from_size("tiny", camera_names=("cam",), image_size=IMG, state_dim=S, action_dim=A, horizon=H,
                                image_grid=8)
    images, state, text = make_inputs()
    cache = FlowVLA(cfg, norm).encode_prefix(images, state, text)
    assert cache.mask.shape[1] == 8 * 8 + 48 // cfg.text_patch + 1
