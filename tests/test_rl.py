"""RL math and learning: samplers' log-probs, Flow-SDE formula, GAE, GRPO, the ratio, a known-optimum task."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sim_trainer.data.normalize import NormStats, Stats
from sim_trainer.envs.vec_env import StepResult
from sim_trainer.errors import UserError
from sim_trainer.models.config import ModelConfig
from sim_trainer.models.flow import time_grid
from sim_trainer.models.flow_vla import FlowVLA
from sim_trainer.models.tokenizer import tokenize, tokenize_batch
from sim_trainer.rl.advantages import gae, grpo_advantages
from sim_trainer.rl.config import RLConfig
from sim_trainer.rl.learner import Learner
from sim_trainer.rl.policy import RLPolicy, SamplerSettings
from sim_trainer.rl.rollout import Collector
from sim_trainer.rl.samplers import gaussian_log_prob, sde_sigma, sde_transition

STATE_DIM, ACTION_DIM, PRIVILEGED_DIM = 3, 2, 4


def identity_norm() -> NormStats:
    def s(n: int) -> Stats:
        return Stats(np.zeros(n), np.ones(n), -np.ones(n), np.ones(n))

    return NormStats(s(STATE_DIM), s(ACTION_DIM))


def tiny_policy(method: str, k: int = 3, sde_mode: str = "mixed", horizon: int = 4, exec_steps: int = 2,
                seed: int = 0, value_input: str = "prefix") -> RLPolicy:
    torch.manual_seed(seed)
    cfg = ModelConfig.from_size("tiny", camera_names=(), image_size=0, state_dim=STATE_DIM, action_dim=ACTION_DIM,
                                horizon=horizon, exec_steps=exec_steps, num_steps=k)
    model = FlowVLA(cfg, identity_norm())
    return RLPolicy(model, SamplerSettings(method, k, sde_mode), value_input, -torch.ones(ACTION_DIM),
                    torch.ones(ACTION_DIM), privileged_dim=PRIVILEGED_DIM if value_input == "privileged" else 0)


TEXT = tokenize("reach the target", 48)


def random_obs(b: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"state": torch.randn(b, STATE_DIM, generator=g), "images": {}}


@pytest.mark.parametrize("method,sde_mode", [("flow_noise", "mixed"), ("reinflow", "mixed"), ("flow_sde", "mixed"),
                                             ("flow_sde", "full")])
def test_sampled_chain_log_prob_equals_recomputed(method, sde_mode):
    policy = tiny_policy(method, sde_mode=sde_mode)
    obs = random_obs(16)
    s = policy.sample(obs, TEXT, torch.Generator().manual_seed(0))
    assert s.chain.shape == (16, 4, 4, ACTION_DIM)
    expected_stochastic = 1 if (method, sde_mode) == ("flow_sde", "mixed") else 3
    assert (s.stochastic.sum(1) == expected_stochastic).all()
    ev = policy.evaluate_chain(obs, TEXT, s.chain, s.stochastic)
    assert ev.log_prob.dtype == torch.float32
    torch.testing.assert_close(ev.log_prob, s.log_prob, atol=1e-5, rtol=0)
    # the executed actions are the last chain element, unnormalised (identity here) and clipped
    torch.testing.assert_close(s.actions, s.chain[:, -1].clamp(-1, 1))


def test_flow_noise_log_prob_by_hand_for_one_step():
    """K = 1: log-prob = (log N(x0; 0, I) + log N(x1; x0 - v(x0, 1), std^2)) / 2, computed independently."""
    policy = tiny_policy("flow_noise", k=1)
    obs = random_obs(4)
    s = policy.sample(obs, TEXT, torch.Generator().manual_seed(3))
    x0, x1 = s.chain[:, 0], s.chain[:, 1]
    with torch.no_grad():
        cache = policy.encode(obs, TEXT)
        v, feats = policy.model.expert_forward(cache, x0, torch.ones(4))
        std = policy.noise_head(feats)
    assert std.min() >= 0.08 and std.max() <= 0.16

    def normal(x, m, sd):
        return -((x - m) ** 2) / (2 * sd**2) - torch.log(sd) - 0.5 * math.log(2 * math.pi)

    by_hand = (normal(x0, 0.0, torch.ones_like(x0)) + normal(x1, x0 - v, std)) / 2
    torch.testing.assert_close(s.log_prob, by_hand, atol=1e-5, rtol=0)


def test_flow_sde_step_matches_formula():
    k_steps, a = 4, 0.5
    grid = time_grid(k_steps)
    stds = [sde_transition(torch.zeros(1, 1, 1), torch.zeros(1, 1, 1), grid[i:i + 1], k_steps, a)[1].item()
            for i in range(k_steps)]
    assert stds == pytest.approx([0.5, 0.433, 0.25, 0.144], abs=1e-3)  # the reference's table for K=4, a=0.5
    assert sde_sigma(torch.tensor([1.0]), a, k_steps).item() == pytest.approx(a * math.sqrt(k_steps))
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(5, 4, 2, generator=g), torch.randn(5, 4, 2, generator=g)
    tau = torch.full((5,), 0.75)
    mean, std = sde_transition(x, v, tau, k_steps, a)
    sigma, delta = a * math.sqrt(0.75 / 0.25), 1 / k_steps
    torch.testing.assert_close(mean, x - delta * v - sigma**2 * delta / (2 * 0.75) * (x + 0.25 * v))
    torch.testing.assert_close(std, torch.full_like(x, sigma * math.sqrt(delta)))
    # the drift correction keeps x0-hat / x1-hat weights: mean = (1 - tau') x0hat + (tau' - sigma^2 delta/2tau) x1hat
    x0hat, x1hat = x - 0.75 * v, x + 0.25 * v
    torch.testing.assert_close(mean, 0.5 * x0hat + (0.5 - sigma**2 * delta / 1.5) * x1hat)


def test_gaussian_log_prob_is_float32_and_exact():
    lp = gaussian_log_prob(torch.tensor([1.0], dtype=torch.float64), torch.tensor([0.0]), torch.tensor([2.0]))
    assert lp.dtype == torch.float32
    assert lp.item() == pytest.approx(-0.125 - math.log(2.0) - 0.5 * math.log(2 * math.pi), abs=1e-6)


def test_gae_on_a_hand_made_sequence():
    # one env, three chunk steps, the episode ends at step 1; gamma = 0.5, lambda = 0.5
    r = torch.tensor([[1.0], [2.0], [0.0]])
    v = torch.tensor([[0.5], [1.0], [2.0]])
    d = torch.tensor([[False], [True], [False]])
    adv, ret = gae(r, v, d, last_value=torch.tensor([4.0]), gamma=0.5, lam=0.5)
    d2 = 0.0 + 0.5 * 4.0 - 2.0  # step 2 bootstraps on the value after the rollout
    d1 = 2.0 - 1.0  # done: no bootstrap
    d0 = 1.0 + 0.5 * 1.0 - 0.5
    expected = torch.tensor([[d0 + 0.25 * d1], [d1], [d2]])
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, expected + v)


def test_grpo_normalises_per_group_and_drops_uniform_groups():
    returns = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    success = returns > 0.5
    adv, keep = grpo_advantages(returns, success, group_size=4)
    assert keep.tolist() == [True] * 4 + [False] * 8  # all-success and all-fail groups carry no signal
    g = returns[:4]
    # the unbiased sample std (divisor G - 1), as the reference GRPO
    torch.testing.assert_close(adv[:4], (g - g.mean()) / (math.sqrt(0.75 / 3) + 1e-6))
    assert adv[:4].sum().abs() < 1e-5
    _, keep_all = grpo_advantages(returns, success, group_size=4, filter_uniform=False)
    assert keep_all.all()
    with pytest.raises(ValueError):
        grpo_advantages(returns, success, group_size=5)


class TargetTask:
    """A one-step task whose optimum is known: reward exp(-|a - a*|^2 / 0.5), success when |a - a*| < 0.2.

    The state is random but irrelevant. Same interface as the vectorised ManiSkill envs.
    """

    def __init__(self, num_envs: int, target: tuple[float, ...]):
        self.num_envs, self.target = num_envs, torch.tensor(target)
        self.gen = torch.Generator().manual_seed(0)

    def _obs(self) -> dict:
        return {"state": torch.randn(self.num_envs, STATE_DIM, generator=self.gen), "images": {}}

    def reset(self, seeds: list[int], mask=None) -> dict:
        return self._obs()

    def step(self, actions: torch.Tensor) -> StepResult:
        dist2 = (actions - self.target).pow(2).sum(-1)
        done = torch.ones(self.num_envs, dtype=torch.bool)
        return StepResult(self._obs(), torch.exp(-dist2 / 0.5), done, torch.zeros_like(done), dist2.sqrt() < 0.2)


def _distance_to_target(policy: RLPolicy, target: torch.Tensor) -> float:
    obs = random_obs(64, seed=9)
    a = policy.act_deterministic(obs, TEXT, torch.zeros(64, policy.model.cfg.horizon, ACTION_DIM))[:, 0]
    return float((a - target).norm(dim=-1).mean())


@pytest.mark.parametrize("algorithm,method", [("ppo", "flow_noise"), ("ppo", "flow_sde"), ("grpo", "flow_noise")])
def test_rl_moves_the_policy_to_the_known_optimum(algorithm, method):
    target = (0.6, -0.4)
    policy = tiny_policy(method, k=2, horizon=2, exec_steps=1)
    # dense reward: GRPO's all-success/all-fail filter is for success rewards (tested above), so it is off here
    cfg = RLConfig(algorithm=algorithm, noise=method, lr=1e-3, value_lr=1e-2, epochs=4, minibatch=64, ent_coef=0.0,
                   group_size=8, logprob="chunk", grpo_filter=False)
    env = TargetTask(64, target)
    collector = Collector(env, policy, TEXT, exec_steps=1, gamma=0.99, episodic=algorithm == "grpo",
                          group_size=cfg.group_size)
    learner = Learner(policy, cfg, TEXT, exec_steps=1)
    before = _distance_to_target(policy, torch.tensor(target))
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    for update in range(25):
        policy.eval()
        rollout = collector.collect(2 if algorithm == "ppo" else 1, rng, gen)
        policy.train()
        metrics = learner.learn(rollout, gen, update)
        assert metrics["first_ratio_max_dev"] == 0.0  # the ratio is exactly 1 on the first minibatch
        assert all(math.isfinite(v) for v in metrics.values() if not math.isnan(v))
    after = _distance_to_target(policy, torch.tensor(target))
    assert after < 0.5 * before, (before, after)


def real_episodes(n: int = 3, length: int = 10) -> list:
    from policy_runtime.episodes import Episode

    g = np.random.default_rng(0)
    return [Episode(state=g.normal(size=(length, STATE_DIM)).astype(np.float32),
                    actions=g.uniform(-1, 1, (length, ACTION_DIM)).astype(np.float32), images={},
                    instruction="reach the target", success=True, control_hz=20.0, source="real-proxy",
                    task="TargetTask", control_mode="pd_joint_delta_pos", state_layout=(("s", STATE_DIM),))
            for _ in range(n)]


def real_sampler(seed: int = 3, horizon: int = 4):
    from sim_trainer.sft.data import ChunkSource, MixedSampler

    source = ChunkSource(real_episodes(), horizon=horizon, tokenize=lambda t: tokenize_batch(t, 48))
    return MixedSampler([source], [1.0], seed=seed)


def test_cotrain_loss_is_the_flow_matching_loss_on_the_real_batch():
    from sim_trainer.models.flow import interpolate, sample_tau

    policy = tiny_policy("flow_noise")
    learner = Learner(policy, RLConfig(cotrain_batch=8, seed=0), TEXT, exec_steps=2, cotrain=real_sampler())
    got = learner.cotrain_loss()
    b = real_sampler().sample(8)  # the same draw, recomputed by hand below
    gen = torch.Generator().manual_seed(0)
    m = policy.model
    a = (b.actions - torch.zeros(ACTION_DIM)) / torch.ones(ACTION_DIM)  # identity normalisation
    noise = torch.randn(a.shape, generator=gen)
    tau = sample_tau(8, gen)
    x, target = interpolate(a, noise, tau)
    v = m.velocity(m.encode_prefix({}, b.state, b.text), x, tau)
    err = (v - target).pow(2).mean(-1)
    expected = (err * b.valid).sum() / b.valid.sum()
    torch.testing.assert_close(got, expected)


def one_step_rollout():
    """A tiny one-step policy and one PPO rollout of it on TargetTask: the input of a single learner update."""
    base = tiny_policy("flow_noise", k=2, horizon=2, exec_steps=1)
    env = TargetTask(32, (0.6, -0.4))
    rollout = Collector(env, base, TEXT, 1, 0.99, episodic=False).collect(2, np.random.default_rng(0),
                                                                          torch.Generator().manual_seed(0))
    return base, rollout


def test_cotrain_weight_zero_is_plain_rl_and_positive_weight_is_not():
    import copy

    base, rollout = one_step_rollout()
    params = {}
    for name, weight, cotrain in (("plain", 0.2, None), ("beta0", 0.0, real_sampler(horizon=2)),
                                  ("beta", 0.5, real_sampler(horizon=2))):
        policy = copy.deepcopy(base)
        cfg = RLConfig(lr=1e-3, epochs=2, minibatch=32, cotrain_weight=weight, cotrain_batch=8)
        metrics = Learner(policy, cfg, TEXT, 1, cotrain=cotrain).learn(rollout, torch.Generator().manual_seed(1), 0)
        if cotrain is not None:
            assert metrics["cotrain_loss"] > 0 and math.isfinite(metrics["cotrain_ratio"])
        params[name] = torch.cat([p.detach().flatten() for p in policy.parameters()])
    assert torch.equal(params["plain"], params["beta0"])
    assert not torch.equal(params["plain"], params["beta"])


def test_target_kl_stops_the_update_after_the_epoch_that_crossed_it():
    import copy

    base, rollout = one_step_rollout()
    ran = {}
    for target_kl in (None, 1e-12, 1e6):
        policy = copy.deepcopy(base)
        cfg = RLConfig(lr=1e-3, epochs=4, minibatch=16, target_kl=target_kl)
        metrics = Learner(policy, cfg, TEXT, 1).learn(rollout, torch.Generator().manual_seed(1), 0)
        ran[target_kl] = metrics["epochs_run"]
        assert metrics["approx_kl"] >= 0 and math.isfinite(metrics["policy_loss"])
    assert ran == {None: 4.0, 1e-12: 1.0, 1e6: 4.0}  # the first epoch always runs; a loose target never stops


class ScriptedEpisodes:
    """Envs whose episodes end at scripted steps; reward 1 on every step, also after the end (must be ignored).

    script[i] = (steps until the episode ends, how it ends: "success", "fail" or "timeout"), counted from a reset.
    The state is (env, steps since the reset, resets so far): V(final observation) is recomputable from it. With
    `privileged`, observations also carry a privileged vector, another function of the same three numbers.
    """

    def __init__(self, script: list[tuple[int, str]], privileged: bool = False):
        self.script, self.num_envs, self.privileged = script, len(script), privileged
        self.t = torch.zeros(self.num_envs)
        self.resets = torch.zeros(self.num_envs)

    def _obs(self) -> dict:
        obs = {"state": torch.stack([torch.arange(self.num_envs).float(), self.t, self.resets], 1), "images": {}}
        if self.privileged:
            obs["privileged"] = privileged_of(obs["state"])
        return obs

    def reset(self, seeds: list[int], mask=None) -> dict:
        m = torch.ones(self.num_envs, dtype=torch.bool) if mask is None else torch.as_tensor(mask)
        self.t[m] = 0
        self.resets[m] += 1
        return self._obs()

    def step(self, actions: torch.Tensor) -> StepResult:
        self.t += 1
        end = torch.tensor([self.t[i] == n for i, (n, _) in enumerate(self.script)])
        how = [h for _, h in self.script]
        success = end & torch.tensor([h == "success" for h in how])
        terminated = end & torch.tensor([h != "timeout" for h in how])
        truncated = end & torch.tensor([h == "timeout" for h in how])
        return StepResult(self._obs(), torch.ones(self.num_envs), terminated, truncated, success)


SCRIPT = [(2, "success"), (5, "timeout"), (100, "timeout"), (4, "fail")]  # with C = 3 actions per chunk step


def privileged_of(state: torch.Tensor) -> torch.Tensor:
    """ScriptedEpisodes' privileged vector of (env, step, resets): [PRIVILEGED_DIM] numbers unlike the state."""
    env, t, resets = state.unbind(-1)
    return torch.stack([t**2 / 10, -resets, env - t, torch.ones_like(t)], -1)


def scripted_rollout(episodic: bool, gamma: float = 0.5, value_input: str = "prefix", ignore_terminations=False):
    policy = tiny_policy("flow_noise", horizon=4, exec_steps=3, value_input=value_input)
    last = [m for m in policy.value_head.modules() if isinstance(m, torch.nn.Linear)][-1]
    torch.nn.init.normal_(last.weight, std=1.0)  # a value head far from zero
    torch.nn.init.constant_(last.bias, 1.0)
    collector = Collector(ScriptedEpisodes(SCRIPT, privileged=value_input == "privileged"), policy, TEXT,
                          exec_steps=3, gamma=gamma, episodic=episodic, group_size=2,
                          ignore_terminations=ignore_terminations)
    r = collector.collect(3, np.random.default_rng(0), torch.Generator().manual_seed(0))
    final_state = torch.tensor([[1.0, 5.0, 1.0]])  # env 1's observation at its time limit: step 5, first episode
    with torch.no_grad():
        v_final = policy.value({"state": final_state, "images": {}, "privileged": privileged_of(final_state)}, TEXT)
    return r, float(v_final), collector


def test_collector_continuing_mode_cuts_chunks_at_the_end_and_bootstraps_only_time_limits():
    r, v_final, _ = scripted_rollout(episodic=False)
    assert abs(v_final) > 0.1  # the bootstrap below is visible
    # env 0 succeeds at its 2nd step in every chunk (reset after each); env 1 times out at step 5 (chunk 1,
    # 2nd action) and is then reset; env 3 fails at step 4 (chunk 1, 1st action)
    expected = torch.tensor([[2.0, 3.0, 3.0, 3.0], [2.0, 2.0 + 0.5 * v_final, 3.0, 1.0], [2.0, 3.0, 3.0, 3.0]])
    torch.testing.assert_close(r.rewards, expected)
    assert r.dones.tolist() == [[True, False, False, False], [True, True, False, True], [True, False, False, False]]
    assert r.valid.all()
    eps = sorted(zip(r.episode_env, r.episodes, strict=True), key=lambda e: (e[0], e[1].length))
    assert [(env, e.length, e.ret, e.success_once) for env, e in eps] == [
        (0, 2, 2.0, True), (0, 2, 2.0, True), (0, 2, 2.0, True), (1, 5, 5.0, False), (3, 4, 4.0, False)]
    assert r.env_steps == 4 * 9


def test_collector_episodic_mode_never_bootstraps_and_masks_steps_after_the_end():
    r, _, _ = scripted_rollout(episodic=True)
    expected = torch.tensor([[2.0, 3.0, 3.0, 3.0], [0.0, 2.0, 3.0, 1.0], [0.0, 0.0, 3.0, 0.0]])
    torch.testing.assert_close(r.rewards, expected)  # a time limit adds no gamma * V (GRPO has no critic)
    assert r.dones.tolist() == [[True, False, False, False], [False, True, False, True], [False, False, False, False]]
    assert r.valid.tolist() == [[True, True, True, True], [False, True, True, True], [False, False, True, False]]
    assert [(env, e.length, e.ret) for env, e in zip(r.episode_env, r.episodes, strict=True)] == [
        (0, 2, 2.0), (1, 5, 5.0), (3, 4, 4.0)]



def test_collector_ignoring_terminations_ends_episodes_only_at_the_time_limit():
    """Env 0's success and env 3's failure no longer end their episodes (their rewards keep coming); env 1's time
    limit still does, bootstrapped."""
    r, v_final, _ = scripted_rollout(episodic=False, ignore_terminations=True)
    expected = torch.tensor([[3.0, 3.0, 3.0, 3.0], [3.0, 2.0 + 0.5 * v_final, 3.0, 3.0], [3.0, 3.0, 3.0, 3.0]])
    torch.testing.assert_close(r.rewards, expected)
    assert r.dones.tolist() == [[False] * 4, [False, True, False, False], [False] * 4]
    assert [(env, e.length, e.ret, e.success_once) for env, e in zip(r.episode_env, r.episodes, strict=True)] == [
        (1, 5, 5.0, False)]


def test_privileged_critic_reads_the_privileged_state_of_the_same_step():
    """Stored per chunk step for the learner; a time limit bootstraps on V(privileged state of the final
    observation), GAE's last value is V(privileged state after the rollout); the update merges the states into
    the critic's running normalisation."""
    r, v_final, collector = scripted_rollout(episodic=False, value_input="privileged")
    policy = collector.policy
    assert abs(v_final) > 0.1  # the bootstrap below is visible
    assert torch.equal(r.privileged, privileged_of(r.states))
    expected = torch.tensor([[2.0, 3.0, 3.0, 3.0], [2.0, 2.0 + 0.5 * v_final, 3.0, 1.0], [2.0, 3.0, 3.0, 3.0]])
    torch.testing.assert_close(r.rewards, expected)
    with torch.no_grad():  # from the privileged vector alone: no state or images given
        torch.testing.assert_close(r.values, policy.value({"privileged": r.privileged.flatten(0, 1)}, TEXT).view(3, 4))
        after = policy.value({"privileged": privileged_of(collector.obs["state"])}, TEXT)
    torch.testing.assert_close(r.last_value, after)
    assert (r.values - r.values[0, 0]).abs().max() > 1e-3  # values vary with the privileged state

    metrics = Learner(policy, RLConfig(value_input="privileged", epochs=1, minibatch=4), TEXT, exec_steps=3).learn(
        r, torch.Generator().manual_seed(0), 0)
    assert metrics["first_ratio_max_dev"] == 0.0 and math.isfinite(metrics["value_loss"])
    norm = policy.value_head.norm
    x = r.privileged.flatten(0, 1).double()
    assert norm.count == 12
    torch.testing.assert_close(norm.mean, x.mean(0))
    torch.testing.assert_close(norm.var, x.var(0, unbiased=False))


def test_running_norm_merges_batches_into_the_moments_of_their_union():
    from sim_trainer.rl.heads import RunningNorm

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, generator=g) * 4 + 2, torch.randn(7, 3, generator=g) - 1
    norm = RunningNorm(3)
    torch.testing.assert_close(norm(a), a.clamp(-10, 10))  # identity before the first merge
    norm.update(a)
    norm.update(b)
    both = torch.cat([a, b]).double()
    torch.testing.assert_close(norm.mean, both.mean(0))
    torch.testing.assert_close(norm.var, both.var(0, unbiased=False))
    z = norm(both.float())
    torch.testing.assert_close(z.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(3), atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["flow_noise", "reinflow"])
def test_the_actor_never_depends_on_the_privileged_state(method):
    """Sampling, log-prob recomputation, entropy, std and deterministic actions are bit-identical when the
    privileged vector is replaced by random values, and the actor's losses have no gradient path to it, while
    the value does (and the value's gradient reaches no actor parameter)."""
    policy = tiny_policy(method, value_input="privileged")
    _randomise_noise_head(policy)  # a std that varies with its inputs
    obs = random_obs(8)
    g = torch.Generator().manual_seed(4)
    obs_a = {**obs, "privileged": torch.randn(8, PRIVILEGED_DIM, generator=g)}
    obs_b = {**obs, "privileged": torch.randn(8, PRIVILEGED_DIM, generator=g) * 100}
    sa = policy.sample(obs_a, TEXT, torch.Generator().manual_seed(0))
    sb = policy.sample(obs_b, TEXT, torch.Generator().manual_seed(0))
    for name in ("chain", "stochastic", "log_prob", "actions"):
        assert torch.equal(getattr(sa, name), getattr(sb, name)), name
    assert not torch.equal(sa.value, sb.value)  # the critic does read it
    ea = policy.evaluate_chain(obs_a, TEXT, sa.chain, sa.stochastic)
    eb = policy.evaluate_chain(obs_b, TEXT, sa.chain, sa.stochastic)
    for name in ("log_prob", "entropy", "std"):
        assert torch.equal(getattr(ea, name), getattr(eb, name)), name
    noise = torch.randn(8, 4, ACTION_DIM, generator=g)
    assert torch.equal(policy.act_deterministic(obs_a, TEXT, noise), policy.act_deterministic(obs_b, TEXT, noise))

    privileged = obs_a["privileged"].clone().requires_grad_(True)
    ev = policy.evaluate_chain({**obs, "privileged": privileged}, TEXT, sa.chain, sa.stochastic)
    actor_loss = -(ev.log_prob.sum() + ev.entropy.sum() + ev.std.sum())
    assert torch.autograd.grad(actor_loss, privileged, allow_unused=True)[0] is None
    actor_params = [p for n, p in policy.named_parameters() if not n.startswith("value_head.")]
    value_grads = torch.autograd.grad(ev.value.pow(2).sum(), [privileged, *actor_params], allow_unused=True)
    assert value_grads[0] is not None and value_grads[0].abs().max() > 0
    assert all(gr is None for gr in value_grads[1:])


def test_privileged_critic_is_ignored_visibly_with_grpo(tmp_path, capsys):
    from sim_trainer.config_flags import load_config

    common = {"ckpt": str(tmp_path), "out": str(tmp_path / "o"), "value_input": "privileged"}
    cfg = load_config(RLConfig, None, {**common, "algorithm": "grpo"})
    assert cfg.value_input == "prefix"  # no critic, so no simulator state to deliver
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "value_input=privileged ignored" in err[0] and "GRPO" in err[0]
    assert load_config(RLConfig, None, {**common, "algorithm": "ppo"}).value_input == "privileged"
    assert capsys.readouterr().err == ""

def test_grpo_gives_every_trajectory_the_same_weight():
    """Episodes of 1, 2, 3 and 2 valid chunk steps, groups (0, 1) and (2, 3) with advantages +-1/sqrt(2).

    With ratio 1 (the first minibatch) the surrogate is -mean(advantage): over trajectories that is 0 for
    group-normalised advantages; a mean over chunk steps would let the longer episode of each group win.
    """
    r, _, _ = scripted_rollout(episodic=True)
    policy = tiny_policy("flow_noise", horizon=4, exec_steps=3)
    cfg = RLConfig(algorithm="grpo", group_size=2, grpo_filter=False, epochs=1, minibatch=12, lr=1e-3)
    learner = Learner(policy, cfg, TEXT, exec_steps=3)
    adv, _, valid, weight = learner.advantages(r)
    torch.testing.assert_close(adv[0], torch.tensor([-1.0, 1.0, 1.0, -1.0]) / math.sqrt(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(weight.sum(0), torch.ones(4))
    torch.testing.assert_close(weight[:, 2], torch.full((3,), 1 / 3))
    assert (weight[~valid] == 0).all()
    metrics = learner.learn(r, torch.Generator().manual_seed(0), 0)
    assert metrics["first_ratio_max_dev"] == 0.0
    assert abs(metrics["policy_loss"]) < 1e-6, metrics["policy_loss"]


def test_critic_warmup_is_ignored_visibly_with_grpo(tmp_path, capsys):
    from sim_trainer.config_flags import load_config
    from sim_trainer.rl.config import RLConfig

    preset = tmp_path / "preset.yaml"
    preset.write_text("critic_warmup: 2\n")  # a PPO preset, run with --algorithm grpo
    common = {"ckpt": str(tmp_path), "out": str(tmp_path / "o")}
    cfg = load_config(RLConfig, str(preset), {**common, "algorithm": "grpo"})
    assert cfg.critic_warmup == 0  # every GRPO update trains the actor
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "critic_warmup=2 ignored" in err[0] and "GRPO" in err[0]
    assert cfg.validate().critic_warmup == 0 and capsys.readouterr().err == ""  # said once
    assert load_config(RLConfig, str(preset), {**common, "algorithm": "ppo"}).critic_warmup == 2
    assert capsys.readouterr().err == ""


def _split_envs(r, rank: int, size: int):
    """This rank's share of a rollout: a contiguous block of its envs (all [T, N] tensors, and last_value)."""
    from dataclasses import replace

    n = r.rewards.shape[1] // size
    cols = slice(rank * n, (rank + 1) * n)
    return replace(r, states=r.states[:, cols], images={k: v[:, cols] for k, v in r.images.items()},
                   chains=r.chains[:, cols], stochastic=r.stochastic[:, cols], log_probs=r.log_probs[:, cols],
                   values=r.values[:, cols], rewards=r.rewards[:, cols], dones=r.dones[:, cols],
                   valid=r.valid[:, cols], last_value=r.last_value[cols], episodes=[], episode_env=[])


def _learn_on_ranks(rank: int, size: int, init_file: str, rollout, cfg: RLConfig, updates: int, out: str) -> None:
    """One rank of a data-parallel learner over gloo: `updates` updates on its share of the same global batch."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from sim_trainer.rl.distributed import World

    torch.set_num_threads(1)
    if size > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    policy = tiny_policy("flow_noise", k=2, horizon=2, exec_steps=1)
    learner = Learner(policy, cfg, TEXT, 1, World(rank, size))
    for update in range(updates):
        learner.learn(_split_envs(rollout, rank, size), torch.Generator().manual_seed(update), update)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in policy.state_dict().items()}, out)
    if size > 1:
        dist.destroy_process_group()


def test_one_and_two_ranks_give_the_same_parameters_for_the_same_global_batch(tmp_path):
    """Critic warm-up leaves the actor without gradients: 2 ranks must not step it either (AdamW's step count)."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    _, rollout = one_step_rollout()  # 32 envs x 2 chunk steps, PPO
    cfg = RLConfig(lr=1e-3, value_lr=1e-2, critic_warmup=1, epochs=1, minibatch=64)  # one minibatch per update
    params = {}
    for size in (1, 2):
        out = str(tmp_path / f"ranks{size}.safetensors")
        mp.spawn(_learn_on_ranks, args=(size, str(tmp_path / f"init{size}"), rollout, cfg, 3, out), nprocs=size)
        params[size] = load_file(out)
    worst = max((float((params[2][name] - p).abs().max()), name) for name, p in params[1].items())
    # round-off only: attention key biases get pure round-off gradients (softmax ignores them), which Adam scales
    # up to ~5e-5 at lr 1e-3; stepping the actor with zeros during warm-up parts the runs by 5e-4 to 1e-2
    assert worst[0] < 2e-4, worst


def _randomise_noise_head(policy: RLPolicy) -> None:
    """The noise heads start at zero (a constant std): give them random weights so the std varies."""
    g = torch.Generator().manual_seed(5)
    for p in policy.noise_head.parameters():
        p.data.normal_(0.0, 1.0, generator=g)


@pytest.mark.parametrize("method", ["flow_noise", "reinflow"])
def test_learned_std_depends_on_the_right_inputs_and_log_probs_still_match(method):
    """Flow-Noise: std per token from the expert's features (observation, x_k, tau). ReinFlow: (observation, tau)."""
    policy = tiny_policy(method)
    _randomise_noise_head(policy)
    g = torch.Generator().manual_seed(2)
    x, x_other = torch.randn(8, 4, ACTION_DIM, generator=g), torch.randn(8, 4, ACTION_DIM, generator=g)
    with torch.no_grad():
        cache, cache_other = policy.encode(random_obs(8, seed=1), TEXT), policy.encode(random_obs(8, seed=2), TEXT)

        def std(c, x_k, k):
            return policy.transition(c, x_k, policy.grid[k].expand(8))[1]

        s = std(cache, x, 0)
    assert s.shape == (8, 4, ACTION_DIM) and s.min() >= 0.08 and s.max() <= 0.16
    assert s.std() > 5e-3  # not a constant
    assert (s - std(cache, x, 1)).abs().max() > 1e-3  # tau
    assert (s - std(cache_other, x, 0)).abs().max() > 1e-3  # the observation
    assert (s - s[:, :1]).abs().max() > 1e-3  # per action token
    if method == "flow_noise":  # the noisy actions x_k, through the expert's per-token features
        assert (s - std(cache, x_other, 0)).abs().max() > 1e-3
    else:
        assert torch.equal(s, std(cache, x_other, 0))
    obs = random_obs(16)
    sample = policy.sample(obs, TEXT, torch.Generator().manual_seed(0))
    ev = policy.evaluate_chain(obs, TEXT, sample.chain, sample.stochastic)
    torch.testing.assert_close(ev.log_prob, sample.log_prob, atol=1e-5, rtol=0)
    assert ev.std.std() > 5e-3


def test_flow_sde_keeps_the_ode_marginals_on_a_gaussian_velocity_field():
    """Data x0 ~ N(mu, s^2): x_tau = (1 - tau) x0 + tau eps has marginal N((1 - tau) mu, (1 - tau)^2 s^2 + tau^2)
    and the exact velocity E[eps - x0 | x_tau] is linear in x. The SDE sampler must follow the same marginals."""
    mu, s, k_steps, n = 0.7, 0.3, 100, 100_000

    def velocity(x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        t = tau.view(-1, 1, 1)
        return -mu + (t - (1 - t) * s**2) / ((1 - t) ** 2 * s**2 + t**2) * (x - (1 - t) * mu)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 1, generator=g, dtype=torch.float64)
    x_ode = x.clone()
    grid = time_grid(k_steps).double()
    for k in range(k_steps):
        tau = grid[k].expand(n)
        mean, std = sde_transition(x, velocity(x, tau), tau, k_steps, noise_level=0.5)
        x = mean + std * torch.randn(x.shape, generator=g, dtype=torch.float64)
        x_ode = x_ode - velocity(x_ode, tau) / k_steps
        t_next = float(grid[k + 1]) if k + 1 < k_steps else 0.0
        sd = math.sqrt((1 - t_next) ** 2 * s**2 + t_next**2)
        assert abs(float(x.mean()) - (1 - t_next) * mu) < 0.01, (k, float(x.mean()))
        assert abs(float(x.std()) / sd - 1) < 0.025, (k, float(x.std()), sd)
        assert abs(float(x.std()) - float(x_ode.std())) < 0.025 * sd, k
    assert abs(float(x.std()) - s) < 0.01 and abs(float(x.mean()) - mu) < 0.01  # the data distribution


def test_std_anneal_holds_then_cosine_decays_to_the_reinflow_end_point():
    from sim_trainer.rl.heads import TokenNoiseHead, annealed_std_max

    lo, hi = 0.08, 0.16
    end = 0.3 * lo + 0.7 * hi
    assert annealed_std_max(lo, hi, 0.0) == annealed_std_max(lo, hi, 0.35) == hi
    assert annealed_std_max(lo, hi, 1.0) == pytest.approx(end)
    assert annealed_std_max(lo, hi, 0.675) == pytest.approx((hi + end) / 2)  # cosine midpoint
    xs = [annealed_std_max(lo, hi, p / 100) for p in range(101)]
    assert all(a >= b for a, b in zip(xs, xs[1:], strict=False))  # never rises again
    head = TokenNoiseHead(8, 2, lo, hi)
    torch.nn.init.normal_(head.net[-1].weight, std=5.0)  # outputs spread over the whole band
    feats = torch.randn(256, 8)
    head.std_max = annealed_std_max(lo, hi, 1.0)
    std = head(feats)
    assert float(std.max()) <= end + 1e-6 and float(std.min()) >= lo - 1e-6 and float(std.max()) > lo + 0.01


def test_std_anneal_is_refused_for_flow_sde(tmp_path):
    from sim_trainer.config_flags import load_config
    from sim_trainer.rl.config import RLConfig

    with pytest.raises(UserError, match="std_anneal"):
        load_config(RLConfig, None, {"ckpt": str(tmp_path), "out": str(tmp_path / "o"), "noise": "flow_sde",
                                     "std_anneal": True})
