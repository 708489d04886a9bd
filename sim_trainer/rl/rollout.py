"""Collect on-policy experience over chunk steps (the outer MDP).

One chunk step: the policy samples a chain for every env, C actions of the chunk are executed, the
chunk's reward is the sum of the C step rewards and it is done if any step ended the episode (rewards
after that step are ignored). In continuing mode a truncated episode's last reward gets
gamma * V(final observation); episodic mode never bootstraps (GRPO has no critic: the value head is untrained
and its noise would be amplified by the group normalisation).

With `ignore_terminations` only the time limit ends an episode: success (and failure) do not, so a shaped reward
keeps paying while the goal is held; reaching the goal is then never worth less than hovering short of it.

Two modes:
- continuing (PPO): ended envs are reset at once with fresh seeds, experience flows across rollouts;
- episodic (GRPO): every env starts a new episode at the start of the rollout, groups of envs share a
  seed (the vectorised env makes envs reset with the same seed start from the same state), and chunk steps
  after an env's episode ended are marked invalid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from sim_trainer.rl.policy import RLPolicy

TRAIN_SEED_START = 1_000_000  # training seeds stay clear of demo seeds (0..) and eval seeds (100000..)


@dataclass
class Episode:
    success_once: bool
    success_at_end: bool
    ret: float
    length: int


@dataclass
class Rollout:
    """Tensors are [T, N, ...] (chunk step, env)."""

    states: torch.Tensor
    images: dict[str, torch.Tensor]
    chains: torch.Tensor
    stochastic: torch.Tensor
    log_probs: torch.Tensor
    values: torch.Tensor
    rewards: torch.Tensor
    dones: torch.Tensor
    valid: torch.Tensor
    last_value: torch.Tensor  # [N] V of the observation after the last step
    privileged: torch.Tensor | None = None  # [T, N, P] the critic's simulator state, when the env delivers it
    episodes: list[Episode] = field(default_factory=list)
    episode_env: list[int] = field(default_factory=list)  # which env each finished episode ran in
    env_steps: int = 0


def _where_rows(mask: torch.Tensor, new: dict, old: dict) -> dict:
    """An observation with `new`'s rows where mask is set and `old`'s elsewhere (state, privileged, images)."""
    def pick(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(mask.view(-1, *[1] * (a.dim() - 1)), a, b)

    out = {k: pick(v, old[k]) for k, v in new.items() if k != "images"}
    out["images"] = {k: pick(v, old["images"][k]) for k, v in new["images"].items()}
    return out


@dataclass
class ChunkOutcome:
    """What executing one chunk did in every env ([N] each); steps after an env's episode ended do not count."""

    reward: torch.Tensor  # sum of the rewards of the live steps
    ended: torch.Tensor  # the episode ended during the chunk
    truncated: torch.Tensor  # it ended by the time limit, not by a termination
    success: torch.Tensor  # success at some live step
    ended_success: torch.Tensor  # success at the step that ended the episode
    live_steps: torch.Tensor  # steps taken before the episode ended (all C where it goes on)
    final_obs: dict  # the observation after each env's last live step (the terminal one where it ended)
    last_obs: dict  # the observation after the chunk's last step


def execute_chunk(venv, actions: torch.Tensor, alive: torch.Tensor | None = None,
                  ignore_terminations: bool = False) -> ChunkOutcome:
    """Execute a chunk [N, C, D] in every env; `alive` marks the envs whose episode is still running.

    An episode ends at its first terminated or truncated step and what its env returns after that is ignored (the
    env still executes the rest of the chunk; the caller resets it). With `ignore_terminations` only the time
    limit ends an episode."""
    device = getattr(venv, "device", torch.device("cpu"))
    n = actions.shape[0]
    alive = torch.ones(n, dtype=torch.bool, device=device) if alive is None else alive.clone()
    start = alive.clone()
    reward = torch.zeros(n, device=device)
    truncated, success, ended_success = (torch.zeros_like(alive) for _ in range(3))
    live_steps = torch.zeros(n, dtype=torch.long, device=device)
    final_obs = None
    for j in range(actions.shape[1]):
        res = venv.step(actions[:, j])
        reward += res.reward * alive
        live_steps += alive.long()
        success |= res.success & alive
        terminated = torch.zeros_like(res.terminated) if ignore_terminations else res.terminated
        ended = (terminated | res.truncated) & alive
        ended_success |= res.success & ended
        truncated |= res.truncated & ~terminated & ended
        final_obs = res.obs if final_obs is None else _where_rows(alive, res.obs, final_obs)
        alive &= ~ended
    return ChunkOutcome(reward, start & ~alive, truncated, success, ended_success, live_steps, final_obs, res.obs)


def _value_of(policy: RLPolicy, obs: dict, text: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return policy(obs, text)  # forward: FSDP gathers the weights for it


class Collector:
    def __init__(self, venv, policy: RLPolicy, text: torch.Tensor, exec_steps: int, gamma: float,
                 episodic: bool, group_size: int = 1, ignore_terminations: bool = False):
        self.venv, self.policy, self.text = venv, policy, text
        self.ignore_terminations = ignore_terminations
        self.exec_steps, self.gamma, self.episodic, self.group_size = exec_steps, gamma, episodic, group_size
        self.n, self.device = venv.num_envs, getattr(venv, "device", torch.device("cpu"))
        self.obs: dict | None = None
        self.ep_ret = torch.zeros(self.n, device=self.device)
        self.ep_len = torch.zeros(self.n, dtype=torch.long, device=self.device)
        self.ep_success = torch.zeros(self.n, dtype=torch.bool, device=self.device)

    def _seeds(self, rng: np.random.Generator) -> list[int]:
        if self.episodic:  # one seed per group of envs
            groups = rng.integers(TRAIN_SEED_START, 2**31 - 1, self.n // self.group_size)
            return np.repeat(groups, self.group_size).tolist()
        return rng.integers(TRAIN_SEED_START, 2**31 - 1, self.n).tolist()

    def _start_all(self, rng: np.random.Generator) -> None:
        self.obs = self.venv.reset(self._seeds(rng))
        self.ep_ret.zero_(), self.ep_len.zero_(), self.ep_success.zero_()

    def collect(self, chunk_steps: int, rng: np.random.Generator, gen: torch.Generator) -> Rollout:
        if self.episodic or self.obs is None:
            self._start_all(rng)
        buf: dict[str, list] = {k: [] for k in ("states", "chains", "stochastic", "log_probs", "values",
                                                "rewards", "dones", "valid")}
        if "privileged" in self.obs:
            buf["privileged"] = []
        images: dict[str, list] = {k: [] for k in self.obs["images"]}
        episodes, episode_env = [], []
        live = torch.ones(self.n, dtype=torch.bool, device=self.device)  # episodic: the env's episode has not ended yet
        env_steps = 0
        for _ in range(chunk_steps):
            s = self.policy.sample(self.obs, self.text, gen)
            buf["states"].append(self.obs["state"])
            if "privileged" in buf:
                buf["privileged"].append(self.obs["privileged"])
            for k, v in self.obs["images"].items():
                images[k].append(v)
            buf["chains"].append(s.chain)
            buf["stochastic"].append(s.stochastic)
            buf["log_probs"].append(s.log_prob)
            buf["values"].append(s.value)
            buf["valid"].append(live.clone())

            out = execute_chunk(self.venv, s.actions[:, :self.exec_steps], live, self.ignore_terminations)
            env_steps += self.n * self.exec_steps
            self.ep_len += out.live_steps
            self.ep_success |= out.success
            done, reward = out.ended, out.reward
            self.ep_ret += reward
            for i in torch.nonzero(done).flatten().tolist():
                episodes.append(Episode(bool(self.ep_success[i]), bool(out.ended_success[i]), float(self.ep_ret[i]),
                                        int(self.ep_len[i])))
                episode_env.append(i)
            if not self.episodic and out.truncated.any():  # bootstrap the cut-off future of time-limited episodes
                reward = reward + self.gamma * _value_of(self.policy, out.final_obs, self.text) * out.truncated
            buf["rewards"].append(reward)
            buf["dones"].append(done)
            next_obs = out.last_obs
            if done.any():
                if self.episodic:
                    live &= ~done
                else:
                    next_obs = self.venv.reset(self._seeds(rng), mask=done.cpu().numpy())
                    self.ep_ret[done], self.ep_len[done], self.ep_success[done] = 0.0, 0, False
            self.obs = next_obs
        last_value = _value_of(self.policy, self.obs, self.text)
        stack = {k: torch.stack(v) for k, v in buf.items()}
        return Rollout(images={k: torch.stack(v) for k, v in images.items()}, last_value=last_value,
                       episodes=episodes, episode_env=episode_env, env_steps=env_steps, **stack)
