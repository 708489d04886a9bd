"""SAC Flow: the flow rollout's exact log-density, gradients through K steps, the replay buffer and SAC itself."""

from __future__ import annotations

import math

import pytest
import torch

from sim_trainer.envs.vec_env import StepResult
from sim_trainer.errors import UserError
from sim_trainer.rl.config import RLConfig
from sim_trainer.rl.flow_velocity import ACTORS, VELOCITIES, FlowActor, GaussianActor
from sim_trainer.rl.replay import NStepWindow, ReplayBuffer
from sim_trainer.rl.sac import SAC, SACSettings
from sim_trainer.rl.sac_trainer import run_chunk

OBS_DIM = 5


def _actor(velocity: str, horizon: int, action_dim: int, num_steps: int, low=-1.0, high=1.0, **kw):
    torch.manual_seed(0)
    lo, hi = torch.full((action_dim,), float(low)), torch.full((action_dim,), float(high))
    if velocity == "gaussian":
        return GaussianActor(OBS_DIM, horizon, action_dim, lo, hi, hidden=32, **kw)
    return FlowActor(OBS_DIM, horizon, action_dim, lo, hi, velocity=velocity, num_steps=num_steps, hidden=32, **kw)


def _log_density_by_jacobian(actor: FlowActor, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The density of (x_0, ..., x_{K-1}, a) by change of variables from (x_0, eps_0..eps_{K-1}) ~ N(0, I), with
    the map's full Jacobian from autograd: log p = log N(noise) - log |det J|. Shares no formula with the actor."""
    k = actor.num_steps

    def chain_of(flat: torch.Tensor) -> torch.Tensor:
        action, chain, _ = actor(obs, noise=flat.view_as(noise))
        return torch.cat([chain[:, :k].flatten(), action.flatten()])

    jac = torch.autograd.functional.jacobian(chain_of, noise.flatten())
    base = torch.distributions.Normal(0.0, 1.0).log_prob(noise).sum()
    return base - torch.linalg.slogdet(jac).logabsdet


@pytest.mark.parametrize("velocity,num_steps", [(v, k) for v in VELOCITIES for k in (1, 2)] + [("gaussian", 0)])
def test_log_density_equals_change_of_variables(velocity: str, num_steps: int):
    actor = _actor(velocity, horizon=2, action_dim=2, num_steps=num_steps, low=-0.5, high=2.0).double()
    obs = torch.randn(1, OBS_DIM, dtype=torch.float64)
    noise = torch.randn(1, num_steps + 1, 2, 2, dtype=torch.float64)
    _, chain, log_prob = actor(obs, noise=noise)
    expected = _log_density_by_jacobian(actor, obs, noise)
    assert float(log_prob) == pytest.approx(float(expected), abs=1e-8)
    if num_steps:  # re-scoring a stored chain agrees
        assert float(actor.log_prob(obs, chain)) == pytest.approx(float(expected), abs=1e-8)


def _normalisation_estimate(actor: FlowActor, samples: int, drop_log_std: bool = False) -> tuple[float, float]:
    """Importance-sampling estimate (and its standard error) of the integral of pi over (x_0, x_1, ..., a) in 1-D:
    x_0 from the prior N(0, 1), the middle states from a wide N(0, 3^2), a uniform over the bounds."""
    gen = torch.Generator().manual_seed(3)
    k = actor.num_steps
    lo, hi = float(actor.action_mid - actor.action_half), float(actor.action_mid + actor.action_half)
    x0 = torch.randn(samples, 1, 1, generator=gen, dtype=torch.float64)
    mids = 3.0 * torch.randn(samples, k - 1, 1, 1, generator=gen, dtype=torch.float64)
    a = lo + (hi - lo) * torch.rand(samples, 1, 1, generator=gen, dtype=torch.float64)
    u = torch.atanh((a - actor.action_mid) / actor.action_half)
    chain = torch.cat([x0[:, None], mids, u[:, None]], dim=1)
    parts = []
    with torch.no_grad():
        for c in chain.split(10_000):
            obs = torch.zeros(len(c), OBS_DIM, dtype=torch.float64)
            log_p = actor.log_prob(obs, c)
            if drop_log_std:  # the density with the -log sigma terms left out
                log_p = log_p + sum(actor.step_stats(obs, c[:, j], j)[1].flatten(1).sum(-1) for j in range(k))
            parts.append(log_p)
    log_p = torch.cat(parts)
    normal = torch.distributions.Normal(0.0, 1.0)
    log_q = normal.log_prob(x0).flatten(1).sum(-1) - math.log(hi - lo)
    log_q = log_q + (normal.log_prob(mids / 3.0) - math.log(3.0)).flatten(1).sum(-1)
    w = torch.exp(log_p - log_q)
    return float(w.mean()), float(w.std() / math.sqrt(samples))


@pytest.mark.parametrize("velocity", VELOCITIES)
@pytest.mark.parametrize("num_steps", [1, 2])
def test_density_integrates_to_one_in_1d(velocity: str, num_steps: int):
    actor = _actor(velocity, horizon=1, action_dim=1, num_steps=num_steps, low=-2.0, high=3.0, std_min=0.3).double()
    mean, se = _normalisation_estimate(actor, 100_000)
    assert abs(mean - 1.0) < max(5 * se, 0.01), (mean, se)
    if num_steps == 1:  # the check is sharp enough to catch a density without its change-of-variables terms
        wrong, _ = _normalisation_estimate(actor, 100_000, drop_log_std=True)
        assert abs(wrong - 1.0) > 0.1


def _grad_norm(velocity: str, num_steps: int, weight_scale: float) -> float:
    """Norm of d mean(x_K^2) / d(velocity parameters): the reparameterised actor gradient's path through K steps.
    Scaling the initial weights stands for a sharper, trained velocity field."""
    actor = _actor(velocity, horizon=4, action_dim=3, num_steps=num_steps)
    with torch.no_grad():
        for m in actor.velocity.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(weight_scale)
    obs = torch.randn(64, OBS_DIM, generator=torch.Generator().manual_seed(1))
    _, chain, _ = actor(obs, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad(chain[:, -1].square().mean(), list(actor.velocity.parameters()))
    return float(torch.sqrt(sum(g.square().sum() for g in grads)))


@pytest.mark.parametrize("weight_scale", [1.0, 2.0, 3.0])
def test_gradients_through_8_steps_stay_bounded(weight_scale: float, capsys):
    ratios = {v: _grad_norm(v, 8, weight_scale) / _grad_norm(v, 1, weight_scale) for v in VELOCITIES}
    with capsys.disabled():
        print(f"\ngrad norm K=8 / K=1 at weight scale {weight_scale}: "
              + ", ".join(f"{v} {r:.3g}" for v, r in ratios.items()))
    for v in ("flow_g", "flow_t"):
        assert math.isfinite(ratios[v]) and ratios[v] < 2.0, ratios
    if weight_scale == 3.0:  # the bound is tight enough to catch the plain velocity's residual-RNN growth
        assert ratios["plain"] > 2.0, ratios


# ----- replay ---------------------------------------------------------------------------------------------------
def _rows(start: int, b: int, obs_dim: int = 3) -> dict[str, torch.Tensor]:
    v = torch.arange(start, start + b, dtype=torch.float32)
    return {"obs": v[:, None].repeat(1, obs_dim), "chunk": v[:, None, None].repeat(1, 2, 2), "reward": v,
            "done": v % 3 == 0, "truncated": v % 6 == 0, "next_obs": v[:, None].repeat(1, obs_dim) + 0.5,
            "steps": torch.ones(b, dtype=torch.int64)}


def test_replay_resume_is_exact(tmp_path):
    """A buffer saved (after wrapping round) and loaded into a fresh one draws the same minibatches as the
    original and stays equal under further writes."""
    a = ReplayBuffer(10, 3, (2, 2), seed=7)
    for start in range(0, 14, 4):
        a.add(_rows(start, 4))
    a.sample(5)
    a.save(tmp_path)
    b = ReplayBuffer(10, 3, (2, 2), seed=99)
    b.load(tmp_path)
    assert (a.pos, a.size) == (b.pos, b.size) == (6, 10)
    for _ in range(3):
        sa, sb = a.sample(8), b.sample(8)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        a.add(_rows(100, 3)), b.add(_rows(100, 3))
    assert all(torch.equal(a.data[k], b.data[k]) for k in a.data)
    with pytest.raises(UserError, match="holds 10 transitions"):
        ReplayBuffer(12, 3, (2, 2), seed=0).load(tmp_path)


def test_replay_oldest_rows_are_overwritten_and_memory_is_known():
    buf = ReplayBuffer(5, 3, (2, 2), seed=0)
    buf.add(_rows(0, 4)), buf.add(_rows(4, 3))
    assert buf.data["reward"].tolist() == [5.0, 6.0, 2.0, 3.0, 4.0]
    per_row = (3 + 4 + 1 + 3) * 4 + 2 + 8  # float32 obs, chunk, reward, next_obs; bool done, truncated; int64 steps
    assert ReplayBuffer.nbytes(1000, 3, (2, 2)) == 1000 * per_row


def test_n_step_window_discounts_and_ends_episodes():
    """n=2, gamma=0.5: full windows emit r0 + 0.5 r1 with next_obs two steps on; an end flushes every pending
    step with its shorter sum and the final observation, keeping done/truncated."""
    win = NStepWindow(num_envs=1, n=2, gamma=0.5)
    o = [torch.full((1, 3), float(i)) for i in range(5)]
    chunk = torch.zeros(1, 2, 2)
    no, yes = torch.tensor([False]), torch.tensor([True])
    assert win.push(o[0], chunk, torch.tensor([1.0]), no, no, o[1]) is None
    first = win.push(o[1], chunk, torch.tensor([2.0]), no, no, o[2])
    assert first["reward"].tolist() == [2.0] and first["steps"].tolist() == [2] and first["next_obs"][0, 0] == 2.0
    assert not first["done"][0]
    end = win.push(o[2], chunk, torch.tensor([4.0]), yes, yes, o[3])
    assert end["reward"].tolist() == [2.0 + 0.5 * 4.0, 4.0] and end["steps"].tolist() == [2, 1]
    assert end["obs"][:, 0].tolist() == [1.0, 2.0] and end["next_obs"][:, 0].tolist() == [3.0, 3.0]
    assert end["done"].all() and end["truncated"].all()
    assert win.push(o[3], chunk, torch.tensor([1.0]), no, no, o[4]) is None  # a new episode starts empty


# ----- SAC ------------------------------------------------------------------------------------------------------
def _sac(velocity: str = "flow_g", horizon: int = 2, action_dim: int = 2, **settings) -> SAC:
    actor = _actor(velocity, horizon, action_dim, num_steps=4, std_min=0.01)
    return SAC(actor, OBS_DIM, horizon, SACSettings(hidden=64, **settings))


def _batch(b: int, horizon: int = 2, action_dim: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"obs": torch.randn(b, OBS_DIM, generator=g), "chunk": torch.rand(b, horizon, action_dim, generator=g),
            "reward": torch.randn(b, generator=g), "done": torch.rand(b, generator=g) < 0.3,
            "truncated": torch.zeros(b, dtype=torch.bool), "next_obs": torch.randn(b, OBS_DIM, generator=g),
            "steps": torch.ones(b, dtype=torch.int64)}


def test_targets_move_by_exactly_tau_per_update():
    sac = _sac(tau=0.25, policy_delay=1)
    sac.critic.double(), sac.critic_target.double()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in _batch(16).items()}
    sac.actor.double()
    with torch.no_grad():  # start the targets apart from the online critics
        for p in sac.critic_target.parameters():
            p.add_(0.1)
    for _ in range(3):
        before = [p.clone() for p in sac.critic_target.parameters()]
        sac.update(batch)
        for old, new, online in zip(before, sac.critic_target.parameters(), sac.critic.parameters(), strict=True):
            torch.testing.assert_close(new, old + 0.25 * (online - old), rtol=0, atol=1e-14)


def test_actor_update_leaves_the_critics_and_follows_policy_delay():
    sac = _sac(policy_delay=3)
    batch = _batch(32)
    actor_before = [p.clone() for p in sac.actor.parameters()]
    for i in range(1, 4):
        critic_before = [p.clone() for p in sac.critic.parameters()]
        metrics = sac.update(batch)
        assert ("actor_loss" in metrics) == (i == 3)
        assert any(not torch.equal(a, b) for a, b in zip(critic_before, sac.critic.parameters(), strict=True))
        moved = any(not torch.equal(a, b) for a, b in zip(actor_before, sac.actor.parameters(), strict=True))
        assert moved == (i == 3)
    critic_before = [p.clone() for p in sac.critic.parameters()]
    sac._update_actor(batch["obs"], None)
    assert all(torch.equal(a, b) for a, b in zip(critic_before, sac.critic.parameters(), strict=True))


def test_critic_warmup_holds_the_actor_for_its_first_updates():
    sac = _sac(policy_delay=1, critic_warmup=3)
    batch = _batch(32)
    actor_before = [p.clone() for p in sac.actor.parameters()]
    for i in range(1, 5):
        metrics = sac.update(batch)
        assert ("actor_loss" in metrics) == (i == 4)
        moved = any(not torch.equal(a, b) for a, b in zip(actor_before, sac.actor.parameters(), strict=True))
        assert moved == (i == 4)


def test_bootstrap_on_truncation_only():
    """A done (success or failure) transition's target is its reward; a truncated or running one adds
    gamma^steps times the soft value of its next observation."""
    sac = _sac()
    batch = _batch(4)
    batch["done"] = torch.tensor([True, True, False, False])
    batch["truncated"] = torch.tensor([False, True, False, False])
    batch["steps"] = torch.tensor([1, 1, 1, 3])
    y = sac.td_target(batch, torch.Generator().manual_seed(1))
    with torch.no_grad():
        chunk, _, logp = sac.actor(batch["next_obs"], generator=torch.Generator().manual_seed(1))
        soft = torch.min(*sac.critic_target(batch["next_obs"], chunk)) - sac.alpha * logp
    expected = batch["reward"] + torch.tensor([0.0, 0.99, 0.99, 0.99 ** 3]) * soft
    torch.testing.assert_close(y, expected)


class ScriptedVenv:
    """Two envs whose steps return scripted (reward, terminated, truncated, success); the state is the step index."""

    def __init__(self, script: list[list[tuple[float, bool, bool, bool]]]):
        self.script, self.t = script, 0

    def step(self, action: torch.Tensor) -> StepResult:
        rows = [env[self.t] for env in self.script]
        self.t += 1
        r, term, trunc, succ = (torch.tensor(col) for col in zip(*rows, strict=True))
        state = torch.full((len(rows), 1), float(self.t))
        return StepResult({"state": state, "images": {}}, r.float(), term, trunc, succ)


@pytest.mark.parametrize("ignore", [False, True])
def test_a_chunk_ends_at_success_unless_terminations_are_ignored(ignore: bool):
    """Env 0 succeeds (terminates) at its 2nd of 4 steps and keeps being rewarded; env 1 hits the time limit at its
    3rd. Success ends env 0's episode (no bootstrap, later rewards dropped) unless terminations are ignored; the
    time limit always ends env 1's, as a truncation."""
    won = (1.0, True, False, True)
    script = [[(0.5, False, False, False), won, won, won],
              [(0.1, False, False, False), (0.1, False, False, False), (0.1, False, True, False),
               (9.0, False, False, False)]]
    reward, done, truncated, final, success = run_chunk(ScriptedVenv(script), torch.zeros(2, 4, 1),
                                                        ignore_terminations=ignore)
    assert success.tolist() == [True, False]
    assert truncated.tolist() == [False, True] and done.tolist() == [not ignore, True]
    torch.testing.assert_close(reward, torch.tensor([3.5 if ignore else 1.5, 0.3]))
    assert final.flatten().tolist() == [4.0 if ignore else 2.0, 3.0]


def test_a_shaped_reward_whose_episodes_end_at_success_is_warned_about(capsys):
    RLConfig(algorithm="sac_flow", reward="normalized_dense", out="unused").validate()
    assert "set ignore_terminations" in capsys.readouterr().err
    for quiet in (dict(reward="normalized_dense", ignore_terminations=True), dict(reward="sparse")):
        RLConfig(algorithm="sac_flow", out="unused", **quiet).validate()
        assert capsys.readouterr().err == ""


@pytest.mark.parametrize("velocity", ACTORS)
def test_sac_flow_solves_a_known_optimum_one_step_task(velocity: str):
    """One-step episodes, reward -mean((a - a*(o))^2) with a*(o) = 0.6 * o inside the bounds: the
    deterministic chunk must land near a* (mean error under 0.08, from about 0.47) within 400 updates."""
    torch.manual_seed(0)
    sac = _sac(velocity, horizon=1, action_dim=2, policy_delay=1, alpha_init=0.01, actor_lr=1e-3)
    buf = ReplayBuffer(4096, OBS_DIM, (1, 2), seed=0)
    g = torch.Generator().manual_seed(0)

    def optimum(obs: torch.Tensor) -> torch.Tensor:
        return 0.6 * obs[:, None, :2]

    def env_batch(n: int) -> dict[str, torch.Tensor]:
        obs = torch.rand(n, OBS_DIM, generator=g) * 2 - 1
        with torch.no_grad():
            chunk = sac.actor(obs, generator=g)[0]
        reward = -(chunk - optimum(obs)).square().mean((1, 2))
        ones = torch.ones(n, dtype=torch.int64)
        return {"obs": obs, "chunk": chunk, "reward": reward, "done": ones.bool(), "truncated": ~ones.bool(),
                "next_obs": obs, "steps": ones}

    test_obs = torch.rand(256, OBS_DIM, generator=torch.Generator().manual_seed(9)) * 2 - 1
    before = float((sac.actor.act_deterministic(test_obs) - optimum(test_obs)).abs().mean())
    for _ in range(400):
        buf.add(env_batch(16))
        sac.update(buf.sample(64), g)
    after = float((sac.actor.act_deterministic(test_obs) - optimum(test_obs)).abs().mean())
    assert after < 0.08 < before, (before, after)
