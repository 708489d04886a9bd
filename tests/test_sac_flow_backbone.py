"""SAC Flow on a pretrained backbone (rl/backbone_actor.py): it starts as the SFT policy, its density is exact, the
gate (Flow-G), the decoder (Flow-T) and the regulariser behave, and a pretrained backbone learns at its own rate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sim_trainer.data.normalize import NormStats, Stats
from sim_trainer.errors import UserError
from sim_trainer.models.config import ModelConfig
from sim_trainer.models.flow_vla import FlowVLA
from sim_trainer.rl.backbone_actor import BackboneFlowActor, with_sac_velocity
from sim_trainer.rl.sac import SAC, SACSettings

S, A, H = 3, 2, 4


def _model(velocity: str = "plain") -> tuple[FlowVLA, NormStats]:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    norm = NormStats(Stats.of(rng.normal(size=(20, S))), Stats.of(rng.normal(size=(20, A)) * 0.3 + 0.1))
    cfg = ModelConfig.from_size("tiny", camera_names=(), image_size=0, state_dim=S, action_dim=A, horizon=H,
                                exec_steps=2, num_steps=2)
    model = FlowVLA(cfg, norm)
    return with_sac_velocity(model, norm, velocity), norm


def _actor(velocity: str = "flow_g", num_steps: int = 2, **kw) -> BackboneFlowActor:
    model, _ = _model(velocity)
    return BackboneFlowActor(model, "push the cube", -torch.ones(A), torch.ones(A), num_steps=num_steps, hidden=16,
                             **kw)


def _move_new_part(model: FlowVLA) -> None:
    """The gate's or the decoder's output layer away from its identity start."""
    with torch.no_grad():
        layer = model.velocity_gate if model.cfg.velocity_gate else model.velocity_decoder.out
        layer.weight.normal_(0, 1.0)


def _velocity(model: FlowVLA, state: torch.Tensor, text: torch.Tensor, x: torch.Tensor,
              tau: torch.Tensor) -> torch.Tensor:
    return model.velocity(model.encode_prefix({}, state, text), x, tau)


def test_the_gate_starts_as_the_ungated_model_and_stays_in_0_2():
    plain, norm = _model()
    gated = with_sac_velocity(plain, norm, "flow_g")
    assert gated.cfg.velocity_gate and not plain.cfg.velocity_gate
    state, text = torch.randn(3, S), plain.tokenize(["push"] * 3)
    x, tau = torch.randn(3, H, A), torch.rand(3)
    v_plain = _velocity(plain, state, text, x, tau)
    assert torch.equal(_velocity(gated, state, text, x, tau), v_plain)
    _move_new_part(gated)
    z = _velocity(gated, state, text, x, tau) / v_plain
    assert (z > 0).all() and (z < 2).all() and not torch.allclose(z, torch.ones_like(z))


def test_the_decoder_starts_as_the_plain_model_and_reads_the_chunk_and_the_observation():
    plain, norm = _model()
    decoded = with_sac_velocity(plain, norm, "flow_t")
    assert decoded.cfg.velocity_decoder and not decoded.cfg.velocity_gate
    state, text = torch.randn(3, S), plain.tokenize(["push"] * 3)
    x, tau = torch.randn(3, H, A), torch.rand(3)
    v_plain = _velocity(plain, state, text, x, tau)
    assert torch.equal(_velocity(decoded, state, text, x, tau), v_plain)
    _move_new_part(decoded)

    def correction(state: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return _velocity(decoded, state, text, x, tau) - _velocity(plain, state, text, x, tau)

    base = correction(state, x)
    assert base.abs().max() > 1e-3
    assert not torch.allclose(correction(state + 1.0, x), base)  # the observation, through the pooled prefix
    x2 = x.clone()
    x2[:, 0] += 1.0  # one action token: the others' corrections change too (self-attention across the chunk)
    assert not torch.allclose(correction(state, x2)[:, 1:], base[:, 1:])
    with pytest.raises(UserError, match="not both"):
        ModelConfig.from_size("tiny", camera_names=(), image_size=0, state_dim=S, action_dim=A,
                              velocity_gate=True, velocity_decoder=True)
    with pytest.raises(UserError, match="fine-tuned with a velocity_gate"):
        with_sac_velocity(with_sac_velocity(plain, norm, "flow_g"), norm, "flow_t")


@pytest.mark.parametrize("num_steps", [1, 2])
def test_without_step_noise_the_chain_is_the_backbones_own_sampler(num_steps):
    actor = _actor(num_steps=num_steps)
    obs = torch.randn(3, S)
    x0 = torch.randn(3, H, A)
    noise = torch.cat([x0[:, None], torch.zeros(3, num_steps, H, A)], 1)  # eps = 0: no step noise
    actions, chain, _ = actor(obs, noise=noise)
    model = actor.model
    expected = model.action_norm.inverse(model.denoise(model.encode_prefix({}, obs, actor.text.expand(3, -1)), x0,
                                                       num_steps))
    assert torch.allclose(chain[:, -1], model.action_norm(expected), atol=1e-6)
    assert torch.allclose(actions, expected.clamp(-1, 1), atol=1e-6)


@pytest.mark.parametrize("velocity", ["flow_g", "flow_t"])
@pytest.mark.parametrize("num_steps", [1, 2])
def test_log_density_equals_change_of_variables_through_the_backbone(num_steps, velocity):
    """(x_0, ..., x_{K-1}, u = de-normalised x_K) from (x_0, eps) by the map's full Jacobian (autograd): shares no
    formula with the actor's sum of Gaussian transitions."""
    actor = _actor(velocity, num_steps=num_steps).double()
    _move_new_part(actor.model)  # a gate or decoder and a noise head away from their initial values
    with torch.no_grad():
        actor.log_std[-1].weight.normal_(0, 1.0)
    obs = torch.randn(1, S, dtype=torch.float64)
    noise = torch.randn(1, num_steps + 1, H, A, dtype=torch.float64)
    _, chain, log_prob = actor(obs, noise=noise)

    def chain_of(flat: torch.Tensor) -> torch.Tensor:
        c = actor(obs, noise=flat.view_as(noise))[1]
        return torch.cat([c[:, :num_steps].flatten(), actor.model.action_norm.inverse(c[:, -1]).flatten()])

    jac = torch.autograd.functional.jacobian(chain_of, noise.flatten())
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(noise).sum() - torch.linalg.slogdet(jac).logabsdet
    assert float(log_prob) == pytest.approx(float(expected), abs=1e-8)
    assert float(actor.log_prob(obs, chain)) == pytest.approx(float(expected), abs=1e-8)


def test_regulariser_is_zero_at_the_start_and_grows_as_the_policy_moves():
    actor = _actor(bc_coef=2.0)
    obs = torch.randn(5, S)
    _, chain, _ = actor(obs)
    assert float(actor.regulariser(obs, chain)) < 1e-10  # (rounding: the two copies are separate modules)
    _move_new_part(actor.model)
    assert float(actor.regulariser(obs, chain)) > 1e-3
    assert float(_actor().regulariser(obs, chain)) == 0.0  # off by default
    assert not any(p is q for p in actor.parameters() for q in actor._start[0].parameters())  # the start is frozen


@pytest.mark.parametrize("velocity,new_part", [("flow_g", "velocity_gate"), ("flow_t", "velocity_decoder")])
def test_pretrained_weights_learn_at_the_backbone_rate_and_new_parts_at_the_actor_rate(velocity, new_part):
    actor = _actor(velocity)
    sac = SAC(actor, S, 2, SACSettings(actor_lr=3e-4, backbone_lr=1e-5, hidden=16))
    lr_of = {id(p): g["lr"] for g in sac.opt.param_groups for p in g["params"]}
    named = dict(actor.named_parameters())
    assert {lr_of[id(p)] for n, p in named.items() if n.startswith("model.") and new_part not in n} == {1e-5}
    assert {lr_of[id(p)] for n, p in named.items() if new_part in n or n.startswith("log_std.")} == {3e-4}
    b = 6
    batch = {"obs": torch.randn(b, S), "chunk": torch.rand(b, 2, A) * 2 - 1, "reward": torch.rand(b),
             "next_obs": torch.randn(b, S), "done": torch.zeros(b, dtype=torch.bool),
             "truncated": torch.zeros(b, dtype=torch.bool), "steps": torch.ones(b, dtype=torch.long)}
    before = {n: p.detach().clone() for n, p in named.items()}
    for _ in range(2):  # policy_delay 2: the second update moves the actor
        metrics = sac.update(batch)
    assert "actor_loss" in metrics
    moved = "model.velocity_gate.weight" if new_part == "velocity_gate" else "model.velocity_decoder.out.weight"
    assert not torch.equal(before[moved], named[moved])
    assert not torch.equal(before["model.action_out.weight"], named["model.action_out.weight"])


def test_default_target_entropy_is_the_chains_entropy_at_the_middle_of_the_noise_band():
    """The default is a reachable target: the entropy when every step's std is at the band's geometric middle
    (checked by Monte Carlo)."""
    actor = _actor(std_min=0.02, std_max=0.16)
    with torch.no_grad():  # log-std head output 0: sigma = sqrt(0.02 * 0.16) everywhere
        actor.log_std[-1].weight.zero_()
        actor.log_std[-1].bias.zero_()
        logp = actor(torch.randn(4000, S), generator=torch.Generator().manual_seed(0))[2]
    assert float(-logp.mean()) == pytest.approx(actor.default_target_entropy(), abs=4 * float(logp.std()) / 63)
    assert SAC(actor, S, 2, SACSettings(hidden=16)).target_entropy == actor.default_target_entropy()


def test_plain_velocity_on_a_quantile_normalised_pi05_has_the_exact_density():
    """The de-normalisation's log-det comes from the model's own normaliser, whatever its mode: pi0.5 maps
    quantiles (u = q01 + (x + 1)(q99 - q01) / 2), so its Jacobian is (q99 - q01) / 2, not a std."""
    from sim_trainer.models.backbones import tiny_backbone

    rng = np.random.default_rng(0)
    norm = NormStats(Stats.of(rng.normal(size=(20, S))), Stats.of(rng.normal(size=(20, A)) * 0.3 + 0.1))
    model = tiny_backbone("pi05-tiny", (), S, A, H, 2, 1, norm)
    actor = BackboneFlowActor(model, "push", -torch.ones(A), torch.ones(A), num_steps=1, hidden=16).double()
    obs = torch.randn(1, S, dtype=torch.float64)
    noise = torch.randn(1, 2, H, A, dtype=torch.float64)
    _, _, log_prob = actor(obs, noise=noise)

    def chain_of(flat: torch.Tensor) -> torch.Tensor:
        c = actor(obs, noise=flat.view_as(noise))[1]
        return torch.cat([c[:, 0].flatten(), actor.model.action_norm.inverse(c[:, -1]).flatten()])

    jac = torch.autograd.functional.jacobian(chain_of, noise.flatten())
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(noise).sum() - torch.linalg.slogdet(jac).logabsdet
    assert float(log_prob) == pytest.approx(float(expected), abs=1e-6)
