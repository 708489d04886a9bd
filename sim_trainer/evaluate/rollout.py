"""Run a chunk policy in vectorised ManiSkill envs on explicit seeds and collect per-episode outcomes.

Envs are never terminated early: every episode runs the task's full horizon (as ManiSkill's own
evaluation with ignore_terminations), so success_once and success_at_end are both well defined and all
envs stay in lockstep, which lets one batched policy call serve every env at each chunk boundary.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from policy_runtime.stats import wilson_interval
from sim_trainer.envs.spec import EnvConfig
from sim_trainer.envs.vec_env import make_vec_env
from sim_trainer.models.checkpoint import check_compatible
from sim_trainer.policy import ChunkPolicy
from sim_trainer.progress import progress_bar

EVAL_SEED_START = 100_000  # demos use seeds from 0; evaluation seeds are held out by default


@dataclass
class EpisodeOutcome:
    seed: int
    success_once: bool
    success_at_end: bool
    length: int  # steps until the first success, or the horizon
    ret: float


@dataclass
class EvalResult:
    task: str
    episodes: list[EpisodeOutcome]
    horizon: int
    env_steps_per_s: float
    policy_ms_per_chunk: float
    frames: list[np.ndarray] = field(default_factory=list)  # first episode, first camera

    def summary(self) -> dict:
        n = len(self.episodes)
        k_once = sum(e.success_once for e in self.episodes)
        k_end = sum(e.success_at_end for e in self.episodes)
        lengths = [e.length for e in self.episodes]
        lo, hi = wilson_interval(k_once, n)
        return {
            "task": self.task,
            "episodes": n,
            "success_once": k_once / n,
            "success_once_wilson95": [lo, hi],
            "success_at_end": k_end / n,
            "success_at_end_wilson95": list(wilson_interval(k_end, n)),
            "mean_length": float(np.mean(lengths)),
            "mean_successful_length": float(np.mean([e.length for e in self.episodes if e.success_once]))
            if k_once else None,
            "mean_return": float(np.mean([e.ret for e in self.episodes])),
            "horizon": self.horizon,
            "env_steps_per_s": self.env_steps_per_s,
            "policy_ms_per_chunk": self.policy_ms_per_chunk,
            "seeds": [e.seed for e in self.episodes],
        }

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "episodes": [asdict(e) for e in self.episodes]}


def evaluate(policy: ChunkPolicy, cfg: EnvConfig, episodes: int, num_envs: int = 1,
             seed_start: int = EVAL_SEED_START, record_video: bool = True, progress: bool = True,
             noise_seed: int = 0) -> EvalResult:
    venv = make_vec_env(cfg, num_envs)
    check_compatible(policy.spec, venv.spec, "under evaluation")
    horizon = cfg.horizon
    gen = torch.Generator().manual_seed(noise_seed)
    outcomes: list[EpisodeOutcome] = []
    frames: list[np.ndarray] = []
    policy_time, policy_calls, env_time, env_steps = 0.0, 0, 0.0, 0
    bar = progress_bar(total=episodes, desc=f"eval {cfg.task}", unit="ep", show=progress)
    try:
        for start in range(0, episodes, num_envs):
            seeds = [seed_start + start + i for i in range(num_envs)]
            obs = venv.reset(seeds)
            success_any = torch.zeros(num_envs, dtype=torch.bool)
            first_success = torch.full((num_envs,), horizon, dtype=torch.long)
            ret = torch.zeros(num_envs)
            chunk, success = None, torch.zeros(num_envs, dtype=torch.bool)
            for t in range(horizon):
                if t % policy.exec_steps == 0:
                    t0 = time.perf_counter()
                    chunk = policy.act(obs, gen)
                    policy_time += time.perf_counter() - t0
                    policy_calls += 1
                if record_video and start == 0 and obs["images"]:
                    frames.append(next(iter(obs["images"].values()))[0].cpu().numpy())
                t0 = time.perf_counter()
                res = venv.step(chunk[:, t % policy.exec_steps])
                env_time += time.perf_counter() - t0
                env_steps += num_envs
                obs, success = res.obs, res.success.cpu()
                newly = success & ~success_any
                first_success[newly] = t + 1
                success_any |= success
                ret += res.reward.cpu()
            for i in range(min(num_envs, episodes - start)):
                outcomes.append(EpisodeOutcome(seeds[i], bool(success_any[i]), bool(success[i]),
                                               int(first_success[i]), float(ret[i])))
            bar.update(min(num_envs, episodes - start))
            bar.set_postfix(success=f"{np.mean([o.success_once for o in outcomes]):.2f}")
    finally:
        bar.close()
        venv.close()
    return EvalResult(cfg.task, outcomes, horizon, env_steps / max(env_time, 1e-9),
                      1000 * policy_time / max(policy_calls, 1), frames)
