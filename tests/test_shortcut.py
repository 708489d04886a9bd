"""Shortcut models: the step-size conditioning, the self-consistency target, the objective, K=1/K=2 sampling in
torch, the RL sampler and ONNX, RL at K=1 with the ReinFlow noise network, and old checkpoints unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from policy_runtime.contract import graph_input_names
from sim_trainer.data.normalize import NormStats, Stats
from sim_trainer.errors import UserError
from sim_trainer.export.onnx_export import export_onnx
from sim_trainer.models.checkpoint import load_checkpoint, save_checkpoint
from sim_trainer.models.config import ModelConfig
from sim_trainer.models.flow import FINEST_STEP, interpolate, sample_consistency_steps, self_consistency_target
from sim_trainer.models.flow_vla import FlowVLA
from sim_trainer.models.tokenizer import tokenize
from sim_trainer.rl.policy import RLPolicy, SamplerSettings
from tests.test_cli import assert_user_error, run_cli
from tests.test_model import IMG, A, B, H, S, make_inputs, make_spec
from tests.test_rl_maniskill import read_metrics, rl_args

OLD_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "pushcube_rgb_small"


_rng = np.random.default_rng(0)
NORM = NormStats(Stats.of(_rng.normal(size=(50, S))), Stats.of(_rng.normal(size=(50, A))))


def make_model(shortcut: bool, seed: int = 0) -> FlowVLA:
    """The tiny test model of test_model.py, with or without the step-size input."""
    torch.manual_seed(seed)
    cfg = ModelConfig.from_size("tiny", camera_names=("cam",), image_size=IMG, state_dim=S, action_dim=A, horizon=H,
                                exec_steps=4, num_steps=2, shortcut=shortcut)
    return FlowVLA(cfg, NORM)


def full(value: float) -> torch.Tensor:
    return torch.full((B,), value)


def test_the_step_size_changes_a_shortcut_models_velocity_and_is_absent_from_a_plain_one():
    images, state, text = make_inputs()
    x, tau = torch.randn(B, H, A), torch.rand(B)
    with torch.no_grad():
        model = make_model(shortcut=True)
        cache = model.encode_prefix(images, state, text)
        assert not torch.allclose(model.velocity(cache, x, tau, full(1.0)), model.velocity(cache, x, tau, full(0.5)))
        with pytest.raises(ValueError, match="step size"):
            model.velocity(cache, x, tau)
        plain = make_model(shortcut=False)
        assert not any(k.startswith("step_mlp") for k in plain.state_dict())
        cache = plain.encode_prefix(images, state, text)
        v = plain.velocity(cache, x, tau)
        assert torch.equal(v, plain.velocity(cache, x, tau, full(1.0)))
        assert torch.equal(v, plain.velocity(cache, x, tau, full(1 / 128)))


def test_flow_matching_on_a_shortcut_model_trains_the_finest_step():
    model = make_model(shortcut=True)
    images, state, text = make_inputs()
    actions, noise, tau = torch.randn(B, H, A), torch.randn(B, H, A), torch.rand(B)
    with torch.no_grad():
        loss = model.flow_matching_loss(images, state, text, actions, noise=noise, tau=tau)
        x_tau, target = interpolate(model.action_norm(actions), noise, tau)
        v = model.velocity(model.encode_prefix(images, state, text), x_tau, tau, full(FINEST_STEP))
    torch.testing.assert_close(loss, (v - target).pow(2).mean())


def gaussian_flow(x: torch.Tensor, tau_from: torch.Tensor, tau_to: torch.Tensor, s: float) -> torch.Tensor:
    """The exact flow map for data A ~ N(0, s^2): x_tau = tau eps + (1 - tau) A is N(0, sigma(tau)^2) and the flow
    scales x by sigma(tau_to) / sigma(tau_from) (a curved path in tau: one Euler step is not exact)."""
    def sigma(t):
        return torch.sqrt(t**2 + (1 - t) ** 2 * s**2).view(-1, 1, 1)

    return x * sigma(tau_to) / sigma(tau_from)


def test_the_self_consistency_target_of_exact_shortcuts_is_the_exact_double_shortcut():
    """With the ideal shortcut model (d-steps land on the true flow), the 2d target is the true 2d mean velocity;
    one Euler step of the instantaneous velocity is not, so the target is not a no-op."""
    s = 0.3
    x = torch.randn(B, H, A)
    tau = torch.tensor([1.0, 0.75, 0.5, 0.25])
    d = torch.tensor([0.5, 0.25, 0.125, 0.125])

    def ideal(x, tau, d):  # mean velocity over [tau - d, tau]
        return (x - gaussian_flow(x, tau, tau - d, s)) / d.view(-1, 1, 1)

    target = self_consistency_target(ideal, x, tau, d)
    torch.testing.assert_close(target, ideal(x, tau, 2 * d))
    torch.testing.assert_close(x - 2 * d.view(-1, 1, 1) * target, gaussian_flow(x, tau, tau - 2 * d, s))
    instantaneous = ideal(x, tau, torch.full_like(d, 1e-6))
    assert not torch.allclose(target, instantaneous, atol=1e-3)

    # a linear field v = m x: two d-steps of Euler are x (1 - d m)^2, so the 2d target is m x (1 - d m / 2)
    m = 0.8
    target = self_consistency_target(lambda x, t, d: m * x, x, tau, d)
    torch.testing.assert_close(target, m * x * (1 - d.view(-1, 1, 1) * m / 2))


def test_consistency_pairs_use_powers_of_two_and_end_inside_the_flow():
    tau, d = sample_consistency_steps(4000, torch.Generator().manual_seed(0))
    assert set(d.tolist()) == {2.0**-k for k in range(1, 8)}  # d in 1/128..1/2, the target's 2d in 1/64..1
    k = tau / (2 * d)  # tau on 2d's grid {2d, 4d, .., 1}
    assert torch.equal(k, k.round()) and (k >= 1).all() and (tau <= 1).all()
    assert set(tau[d == 0.5].tolist()) == {1.0} and len(set(tau[d == 2.0**-7].tolist())) > 30


def test_shortcut_sft_loss_falls_on_a_tiny_dataset():
    model = make_model(shortcut=True)
    images, state, text = make_inputs()
    actions = torch.randn(B, H, A)

    def probe_loss() -> float:  # the same noise, times and step sizes each time, averaged over 4 draws
        with torch.no_grad():
            return sum(model.shortcut_loss(images, state, text, actions, generator=torch.Generator().manual_seed(s))
                       .item() for s in range(4)) / 4

    before = probe_loss()
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model.shortcut_loss(images, state, text, actions, consistency_fraction=0.25, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert probe_loss() < 0.7 * before
    with pytest.raises(ValueError, match="shortcut=True"):
        make_model(shortcut=False).shortcut_loss(images, state, text, actions)


def test_denoise_and_the_rl_sampler_give_a_shortcut_model_d_equal_1_over_k():
    model = make_model(shortcut=True).eval()
    images, state, text = make_inputs()
    noise = torch.randn(B, H, A)
    with torch.no_grad():
        cache = model.encode_prefix(images, state, text)
        one = noise - model.velocity(cache, noise, full(1.0), full(1.0))
        torch.testing.assert_close(model.denoise(cache, noise, 1), one)
        half = noise - 0.5 * model.velocity(cache, noise, full(1.0), full(0.5))
        two = half - 0.5 * model.velocity(cache, half, full(0.5), full(0.5))
        torch.testing.assert_close(model.denoise(cache, noise, 2), two)
        for k in (1, 2):
            policy = RLPolicy(model, SamplerSettings("reinflow", k), "expert", -torch.ones(A), torch.ones(A))
            _, _, ode_mean = policy.transition(cache, noise, full(1.0))
            torch.testing.assert_close(ode_mean, noise - model.velocity(cache, noise, full(1.0), full(1 / k)) / k)
            policy.value({}, text, cache)  # the expert-feature critic input is a valid call on a shortcut model too


def test_a_checkpoint_from_before_shortcut_models_loads_and_samples_as_before():
    """checkpoints/pushcube_rgb_small was written before the step-size input existed: it loads as a plain model
    with no new weights, and samples exactly the plain K-step Euler chain of v(x, tau)."""
    loaded = load_checkpoint(OLD_CHECKPOINT)
    model = loaded.model
    assert model.cfg.shortcut is False and not any(k.startswith("step_mlp") for k in model.state_dict())
    g = torch.Generator().manual_seed(0)
    images = {"base_camera": torch.randint(0, 256, (2, 64, 64, 3), generator=g, dtype=torch.uint8)}
    state = torch.randn(2, loaded.spec.state_dim, generator=g)
    text = tokenize(loaded.spec.instruction, 48).expand(2, -1)
    noise = torch.randn(2, model.cfg.horizon, model.cfg.action_dim, generator=g)
    with torch.no_grad():
        cache = model.encode_prefix(images, state, text)
        x = noise
        for tau_k in (1.0, 0.75, 0.5, 0.25):
            x = x - 0.25 * model.velocity(cache, x, torch.full((2,), tau_k))
        assert torch.equal(model.sample_actions(images, state, text, noise, 4), model.action_norm.inverse(x))


def test_the_shortcut_flag_round_trips_and_is_checked(tmp_path):
    model = make_model(shortcut=True)
    save_checkpoint(tmp_path / "ck", model, make_spec(), NORM)
    assert load_checkpoint(tmp_path / "ck").model.cfg.shortcut is True
    save_checkpoint(tmp_path / "plain", make_model(shortcut=False), make_spec(), NORM)
    assert "shortcut" not in json.loads((tmp_path / "plain" / "config.json").read_text())["model"]  # as before
    with pytest.raises(UserError, match="shortcut must be true or false"):
        ModelConfig.from_dict({**model.cfg.to_dict(), "cnn_channels": [8, 16, 32], "camera_names": ["cam"],
                               "shortcut": "yes"})


@pytest.mark.parametrize("k", [1, 2])
def test_onnx_export_of_a_shortcut_model_bakes_in_d_and_matches_torch(tmp_path, k):
    model = make_model(shortcut=True).eval()
    save_checkpoint(tmp_path / "ck", model, make_spec(), NORM)
    out = export_onnx(tmp_path / "ck", tmp_path / "export", num_steps=k).out
    session = ort.InferenceSession(str(out / "policy.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == graph_input_names(["cam"])  # no step-size input
    images, state, text = make_inputs(seed=3)
    noise = torch.randn(B, H, A)
    got = session.run(["actions"], dict(zip(graph_input_names(["cam"]),
                                            [t.numpy() for t in (images["cam"], state, text, noise)], strict=True)))[0]
    loaded = load_checkpoint(tmp_path / "ck").model
    with torch.no_grad():
        cache = loaded.encode_prefix(images, state, text)
        x = noise  # the K-step chain written out with d = 1/K, independently of denoise()
        for tau_k in (1.0, 0.5)[:k]:
            x = x - loaded.velocity(cache, x, full(tau_k), full(1 / k)) / k
        expected = loaded.action_norm.inverse(x).numpy()
        ref = loaded.sample_actions(images, state, text, noise, k).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    np.testing.assert_allclose(got, ref, atol=1e-4)


@pytest.fixture(scope="module")
def shortcut_state_checkpoint(state_demos, tmp_path_factory):
    from sim_trainer.sft.trainer import SFTConfig, train_sft

    out = tmp_path_factory.mktemp("ckpt") / "tiny_state_shortcut"
    train_sft(SFTConfig(data=[str(state_demos)], out=str(out), size="tiny", steps=10, batch_size=8, horizon=8,
                        exec_steps=4, num_steps=1, warmup=2, save_every=10, objective="shortcut"))
    return out


def test_rl_at_one_step_with_the_reinflow_noise_network_on_a_shortcut_checkpoint(shortcut_state_checkpoint,
                                                                                 tmp_path):
    assert load_checkpoint(shortcut_state_checkpoint).model.cfg.shortcut is True
    out = tmp_path / "run"
    proc = run_cli(*rl_args(shortcut_state_checkpoint, out), "--noise", "reinflow", "--num-steps", "1",
                   "--total-env-steps", "48")  # two updates of 2 envs x 3 chunks x 4 actions
    assert proc.returncode == 0, proc.stderr
    updates, evals = read_metrics(out)
    assert [u["update"] for u in updates] == [1, 2] and len(evals) == 2
    loaded = load_checkpoint(out)
    assert loaded.model.cfg.shortcut is True and loaded.model.cfg.num_steps == 1


def test_bad_objectives_are_one_line_user_errors(state_demos, tmp_path):
    assert_user_error(run_cli("sft", "--data", str(state_demos), "--out", str(tmp_path / "o"), "--objective",
                              "diffusion"), "unknown objective")
    assert_user_error(run_cli("sft", "--data", str(state_demos), "--out", str(tmp_path / "o"),
                              "--consistency-fraction", "1"), "consistency_fraction")
