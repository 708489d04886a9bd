"""The entropic-risk objective (--risk-beta B): (1/B) log E[exp(B * return)] for GRPO and PPO.

B = 0 must be the risk-neutral code exactly, B -> 0 must approach it continuously, the signs must weigh the
right episodes, and PPO's exponential TD error must have the entropic value as its fixed point.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from dataclasses import replace

import pytest
import torch

from sim_trainer.errors import UserError
from sim_trainer.rl.advantages import exp_utility, gae, grpo_advantages
from sim_trainer.rl.config import RLConfig
from sim_trainer.rl.learner import Learner
from tests.bad_input import ROOT, assert_refused_unchanged
from tests.test_rl import TEXT, one_step_rollout

SHIPPED = ROOT / "checkpoints" / "pushcube_rgb_small"


def neutral_gae(rewards, values, dones, last_value, gamma, lam):
    """The risk-neutral GAE recursion as it was before the risk option, verbatim: the reference for B = 0."""
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(last_value)
    for t in reversed(range(rewards.shape[0])):
        next_value = last_value if t == rewards.shape[0] - 1 else values[t + 1]
        not_done = 1.0 - dones[t].float()
        delta = rewards[t] + gamma * next_value * not_done - values[t]
        running = delta + gamma * lam * not_done * running
        adv[t] = running
    return adv, adv + values


def neutral_grpo(returns, group_size, eps=1e-6):
    r = returns.float().view(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=True, keepdim=True) + eps)).view(-1)


def random_batch(t: int = 6, n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(t, n, generator=g), torch.rand(t, n, generator=g), torch.rand(t, n, generator=g) < 0.2,
            torch.rand(n, generator=g))


def test_exp_utility_is_the_identity_at_zero_and_accurate_near_it():
    x = torch.tensor([-3.0, -0.5, 0.0, 0.25, 2.0])
    assert exp_utility(x, 0.0) is x
    torch.testing.assert_close(exp_utility(x, 0.5), (torch.exp(0.5 * x) - 1) / 0.5)
    # expm1: at B = 1e-7 the naive (exp(B x) - 1) / B has float32 rounding error ~1; expm1 is within 1e-6
    torch.testing.assert_close(exp_utility(x, 1e-7), x, rtol=1e-6, atol=1e-6)


def test_zero_beta_is_the_risk_neutral_code_bit_for_bit():
    rewards, values, dones, last = random_batch()
    for got, want in zip(gae(rewards, values, dones, last, 0.9, 0.8, risk_beta=0.0),
                         neutral_gae(rewards, values, dones, last, 0.9, 0.8), strict=True):
        assert torch.equal(got, want)
    returns = torch.rand(12, generator=torch.Generator().manual_seed(1))
    adv, _ = grpo_advantages(returns, returns > 0.5, 4, risk_beta=0.0)
    assert torch.equal(adv, neutral_grpo(returns, 4))


def test_small_beta_converges_to_the_risk_neutral_advantages():
    rewards, values, dones, last = random_batch()
    returns = 3 * torch.rand(12, generator=torch.Generator().manual_seed(1))
    for beta in (1e-6, -1e-6):
        for got, want in zip(gae(rewards, values, dones, last, 0.9, 0.8, risk_beta=beta),
                             gae(rewards, values, dones, last, 0.9, 0.8), strict=True):
            torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
        got, _ = grpo_advantages(returns, returns > 1, 4, risk_beta=beta)
        torch.testing.assert_close(got, neutral_grpo(returns, 4), rtol=1e-5, atol=1e-5)
    # and it is a real change at a finite beta
    assert not torch.allclose(grpo_advantages(returns, returns > 1, 4, risk_beta=1.0)[0], neutral_grpo(returns, 4))


@pytest.mark.parametrize("beta", [2.0, -2.0, 0.3])
def test_group_shift_is_irrelevant_and_the_weights_are_the_entropic_ones(beta):
    """The per-group anchor c (best or worst return) cancels: the advantages are those of exp(B R) itself."""
    returns = torch.tensor([0.0, 0.5, 1.0, 2.0, 1.0, 1.2, 1.4, 3.0], dtype=torch.float64)
    got, _ = grpo_advantages(returns, returns > 1, 4, risk_beta=beta)
    expected = neutral_grpo(torch.exp(beta * returns) * (1 if beta > 0 else -1), 4)  # unshifted, by hand
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)
    offset = torch.tensor([5.0] * 4 + [-7.0] * 4, dtype=torch.float64)  # another constant per group
    torch.testing.assert_close(grpo_advantages(returns + offset, returns > 1, 4, risk_beta=beta)[0], got,
                               rtol=1e-5, atol=1e-5)


def test_huge_beta_times_returns_stays_finite():
    returns = torch.tensor([0.0, 10.0, 20.0, 30.0])
    for beta in (50.0, -50.0):  # exp(50 * 30) overflows; the anchored form does not
        adv, _ = grpo_advantages(returns, returns > 15, 4, risk_beta=beta)
        assert torch.isfinite(adv).all()
        assert adv[3] == adv.max() and adv[0] == adv.min()  # the order is kept (the middle ones may tie)


def test_risk_seeking_weighs_the_best_and_risk_averse_the_worst():
    returns = torch.tensor([0.0, 1.0, 2.0, 3.0])
    neutral, _ = grpo_advantages(returns, returns > 1, 4)
    seeking, _ = grpo_advantages(returns, returns > 1, 4, risk_beta=2.0)
    averse, _ = grpo_advantages(returns, returns > 1, 4, risk_beta=-2.0)
    for adv in (neutral, seeking, averse):  # every setting still prefers higher returns
        assert (adv.diff() > 0).all()
    assert seeking[3] > neutral[3] + 0.2 and seeking[0] > neutral[0]  # the best episode stands out; the rest alike
    assert averse[0] < neutral[0] - 0.2 and averse[3] < neutral[3]  # the worst episode is pushed away hardest
    torch.testing.assert_close(seeking, -averse.flip(0))  # the two signs mirror each other on symmetric returns


@pytest.mark.parametrize("beta", [2.0, -2.0, 0.5])
def test_exponential_td_fixed_point_is_the_entropic_value(beta):
    """A one-step bandit, reward 0 or 1 at p = 0.5: regressing V on the exponential-TD target of gae() must
    converge to the certainty equivalent (1/B) log(0.5 + 0.5 e^B), not to the mean 0.5."""
    rewards = torch.tensor([[0.0, 1.0]])  # the two outcomes, equally likely
    dones = torch.ones(1, 2, dtype=torch.bool)
    v = torch.tensor(0.5)
    for _ in range(2000):
        values = v.expand(1, 2)
        adv, ret = gae(rewards, values, dones, torch.zeros(2), gamma=0.99, lam=0.95, risk_beta=beta)
        v = v + 0.5 * (ret - values).mean()  # a gradient step of the squared value loss towards the targets
    assert v.item() == pytest.approx(math.log(0.5 + 0.5 * math.exp(beta)) / beta, abs=1e-5)
    assert (v.item() > 0.5) == (beta > 0)


def _learn(cfg: RLConfig, advantages=None) -> torch.Tensor:
    """The parameter change of one learner update on a fixed PPO rollout of a tiny policy."""
    base, rollout = one_step_rollout()
    policy = copy.deepcopy(base)
    learner = Learner(policy, cfg, TEXT, 1)
    if advantages is not None:
        learner.advantages = advantages
    learner.learn(rollout, torch.Generator().manual_seed(1), 0)
    return torch.cat([(p - q).detach().flatten() for p, q in zip(policy.parameters(), base.parameters(), strict=True)])


def test_learner_update_at_zero_beta_is_the_risk_neutral_update():
    cfg = RLConfig(lr=1e-3, epochs=2, minibatch=32)
    _, rollout = one_step_rollout()

    def neutral(r):  # the learner's PPO advantages as they were before the risk option (one process)
        adv, ret = neutral_gae(r.rewards, r.values, r.dones, r.last_value, cfg.gamma, cfg.gae_lambda)
        valid = r.valid
        n = valid.sum().float().view(1)
        mean = adv[valid].sum().view(1) / n
        var = ((adv[valid] - mean) ** 2).sum().view(1) / n
        return (adv - mean) / (var.sqrt() + 1e-8), ret, valid, valid.float()

    learner = Learner(copy.deepcopy(one_step_rollout()[0]), replace(cfg, risk_beta=0.0), TEXT, 1)
    for got, want in zip(learner.advantages(rollout), neutral(rollout), strict=True):
        assert torch.equal(got, want)
    reference = _learn(cfg, neutral)
    assert torch.equal(_learn(replace(cfg, risk_beta=0.0)), reference)

    def distance(beta: float) -> float:  # relative to the update's size
        return float((_learn(replace(cfg, risk_beta=beta)) - reference).norm() / reference.norm())

    # not elementwise: AdamW's g / sqrt(v) turns float-level differences of near-zero gradients into visible steps
    assert distance(1e-6) < 1e-3
    assert distance(-2.0) > 0.1


def test_config_refuses_out_of_range_and_meaningless_betas(tmp_path):
    base = {"ckpt": str(tmp_path), "out": str(tmp_path / "o")}
    with pytest.raises(UserError, match="risk_beta must be in"):
        RLConfig(**base, risk_beta=51.0).validate()
    with pytest.raises(UserError, match="no effect with GRPO on sparse rewards"):
        RLConfig(**base, algorithm="grpo", risk_beta=-1.0).validate()
    RLConfig(**base, algorithm="grpo", reward="normalized_dense", risk_beta=-0.05).validate()
    RLConfig(**base, risk_beta=-2.0).validate()  # PPO on sparse returns


@pytest.fixture
def rl_run(tmp_path):
    """A saved RL state (written by the trainer, no envs) and its start checkpoint."""
    from sim_trainer.rl.trainer import RLTrainer

    ckpt = shutil.copytree(SHIPPED, tmp_path / "ckpt")
    out = tmp_path / "rl"
    RLTrainer(RLConfig(ckpt=str(ckpt), out=str(out), num_envs=2, eval_envs=1, risk_beta=-2.0)).save()
    return ckpt, out


def test_cli_refuses_a_bad_beta_and_resuming_with_another(rl_run, tmp_path):
    ckpt, out = rl_run
    base = ["rl", "--ckpt", str(ckpt), "--num-envs", "2", "--eval-envs", "1", "--threads", "1"]
    assert_refused_unchanged("sim-trainer", [*base, "--out", str(tmp_path / "new"), "--risk-beta", "-60"],
                             watched=[tmp_path], contains="risk_beta must be in")
    grpo = ["--algorithm", "grpo", "--group-size", "2"]
    assert_refused_unchanged("sim-trainer", [*base, "--out", str(tmp_path / "new"), *grpo, "--risk-beta", "1"],
                             watched=[tmp_path], contains="GRPO on sparse")
    line = assert_refused_unchanged("sim-trainer", [*base, "--out", str(out), "--resume", "--risk-beta", "2"],
                                    watched=[tmp_path], contains="risk_beta=-2.0")
    assert "risk_beta=2.0" in line


def test_a_state_saved_before_the_option_resumes_as_risk_neutral(rl_run):
    from sim_trainer.rl.trainer import RLTrainer

    ckpt, out = rl_run
    meta_path = out / "rl_state.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]["risk_beta"]  # as written before the option existed
    meta_path.write_text(json.dumps(meta))
    cfg = dict(ckpt=str(ckpt), out=str(out), num_envs=2, eval_envs=1, resume=True)
    RLTrainer(RLConfig(**cfg))  # the old run was risk-neutral: resumable with the default
    with pytest.raises(UserError, match="risk_beta=0.0"):
        RLTrainer(RLConfig(**cfg, risk_beta=1.0))


def test_a_beta_out_of_scale_with_the_returns_is_warned_about(capsys):
    from sim_trainer.rl.trainer import _check_risk_scale

    _check_risk_scale(RLConfig(risk_beta=2.0), horizon=50)  # sparse returns in [0, 1]: in scale
    assert capsys.readouterr().err == ""
    _check_risk_scale(RLConfig(risk_beta=-2.0, reward="normalized_dense"), horizon=50)  # returns in [0, 50]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "e^100" in err[0] and "2 / 50" in err[0]
