"""Demonstrations from ManiSkill's motion-planning solutions, converted to the policy's control mode.

For each seed: (1) the Panda motion planner solves the task in `pd_joint_pos`; (2) its joint targets are
replayed with ManiSkill's controller conversion into the policy's control mode (joint deltas or EE
delta poses) in a second env that renders the policy's observations; (3) the converted episode is kept
only if it succeeds too. Failed plans and failed conversions are skipped and counted.

In a shifted domain (EnvConfig.domain, e.g. the real-proxy one) all three envs are shifted: the planner
plans in the shifted physics, and the converter closes its loop through the action latency, so the
recorded (observation, action) pairs carry the latency and noise as a real robot's recordings would.
Such episodes are labelled source "real-proxy".
"""

from __future__ import annotations

import multiprocessing as mp
import os
from dataclasses import dataclass, replace
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from policy_runtime.contract import PolicySpec
from policy_runtime.episodes import Episode, EpisodeWriter
from sim_trainer.config_check import SEED_MAX
from sim_trainer.envs.adapter import adapt
from sim_trainer.envs.domain import load_domain
from sim_trainer.envs.make import make_maniskill_env, spec_from_env
from sim_trainer.envs.spec import EnvConfig
from sim_trainer.envs.tasks import get_task
from sim_trainer.errors import UserError
from sim_trainer.progress import progress_bar
from sim_trainer.run_dir import DATASET_ENTRIES, RunDir

CONVERSION_STEP_LIMIT = 10_000  # the converter may take several env steps per planner step


class _ActionRecorder(gym.Wrapper):
    def reset(self, **kwargs):
        self.actions: list[np.ndarray] = []
        return self.env.reset(**kwargs)

    def step(self, action):
        self.actions.append(np.asarray(action, dtype=np.float32).reshape(-1))
        return self.env.step(action)


class _EpisodeRecorder(gym.Wrapper):
    """Records (policy observation, action) pairs and per-step success while the converter drives it."""

    def __init__(self, env: gym.Env, cfg: EnvConfig):
        super().__init__(env)
        self.cfg = cfg

    def reset(self, **kwargs):
        raw, info = self.env.reset(**kwargs)
        self.raw0 = raw
        self._obs = adapt(raw, self.cfg.image_size, self.cfg.obs_mode == "rgb")
        self.states, self.actions, self.rewards, self.success = [], [], [], []
        self.images: dict[str, list] = {k: [] for k in self._obs["images"]}
        return raw, info

    def step(self, action):
        a = torch.as_tensor(action, dtype=torch.float32).reshape(1, -1)
        self.states.append(self._obs["state"][0].numpy())
        for k, v in self._obs["images"].items():
            self.images[k].append(v[0].numpy())
        self.actions.append(a[0].numpy())
        raw, reward, terminated, truncated, info = self.env.step(a)
        self._obs = adapt(raw, self.cfg.image_size, self.cfg.obs_mode == "rgb")
        self.rewards.append(float(reward[0]))
        self.success.append(bool(info["success"][0]))
        return raw, reward, terminated, truncated, info


@dataclass
class DemoResult:
    seed: int
    ok: bool
    reason: str = ""
    episode: Episode | None = None
    spec: PolicySpec | None = None


def plan_and_convert(cfg: EnvConfig, seed: int) -> DemoResult:
    """Solve one seed with the motion planner and convert it into the policy's control/obs modes."""
    from mani_skill.examples.motionplanning.panda.run import MP_SOLUTIONS
    from mani_skill.trajectory.utils.actions.conversion import from_pd_joint_pos

    solve = MP_SOLUTIONS[cfg.task]
    plan_cfg = replace(cfg, sim_backend="physx_cpu")
    plan_env = _ActionRecorder(make_maniskill_env(plan_cfg, control_mode="pd_joint_pos", obs_mode="none",
                                                  max_episode_steps=CONVERSION_STEP_LIMIT))
    try:
        try:
            res = solve(plan_env, seed=seed, debug=False, vis=False)
        except Exception as e:  # the planner raises on unreachable goals and IK failures
            return DemoResult(seed, False, f"planner error: {type(e).__name__}")
        if isinstance(res, int) or not bool(res[-1]["success"].item()):
            return DemoResult(seed, False, "plan failed")
        planned = np.stack(plan_env.actions)
    finally:
        plan_env.close()

    ori_env = make_maniskill_env(plan_cfg, control_mode="pd_joint_pos", obs_mode="none",
                                 max_episode_steps=CONVERSION_STEP_LIMIT)
    rec = _EpisodeRecorder(make_maniskill_env(plan_cfg, max_episode_steps=CONVERSION_STEP_LIMIT), plan_cfg)
    try:
        ori_env.reset(seed=seed)
        rec.reset(seed=seed)
        spec = spec_from_env(plan_cfg, rec.env, rec.raw0)
        from_pd_joint_pos(cfg.control_mode, planned, ori_env, rec)
    finally:
        ori_env.close()
        rec.close()
    if not any(rec.success):
        return DemoResult(seed, False, "conversion failed")
    # Keep a few steps after the first success so the policy also learns to settle.
    end = min(len(rec.actions), rec.success.index(True) + 10)
    provenance = {"generator": "maniskill-motion-planning", "seed": seed, "planner_steps": len(planned),
                  "env_config": cfg.to_dict()}
    if cfg.domain:
        provenance["domain"] = load_domain(cfg.domain).to_dict()  # the values, in case the YAML changes later
    ep = Episode(
        state=np.stack(rec.states[:end]),
        actions=np.stack(rec.actions[:end]),
        images={k: np.stack(v[:end]) for k, v in rec.images.items()},
        instruction=spec.instruction,
        success=True,
        control_hz=spec.control_hz,
        source="real-proxy" if cfg.domain else "sim",
        task=cfg.task,
        control_mode=cfg.control_mode,
        state_layout=spec.state_layout,
        provenance=provenance,
        reward=np.asarray(rec.rewards[:end], np.float32),
    )
    return DemoResult(seed, True, episode=ep, spec=spec)


def _worker(args: tuple[dict, int]) -> DemoResult:
    cfg_dict, seed = args
    torch.set_num_threads(1)
    return plan_and_convert(EnvConfig.from_dict(cfg_dict), seed)


MAX_DEMOS = 100_000
MAX_IMAGE_SIZE = 512


def _check_counts(cfg: EnvConfig, num: int, seed_start: int, workers: int, max_attempts: int) -> None:
    """Every count within a sane range before any planning: one typo must not exhaust the machine."""
    cores = os.cpu_count() or 1
    checks = [("number of demos (-n)", num, 1, MAX_DEMOS), ("--workers", workers, 1, cores),
              ("--image-size", cfg.image_size, 16, MAX_IMAGE_SIZE),
              ("--seed-start", seed_start, 0, SEED_MAX + 1 - max_attempts)]
    for name, value, lo, hi in checks:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise UserError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")


def generate_demos(cfg: EnvConfig, num: int, out: str | Path, seed_start: int = 0, workers: int = 1,
                   max_attempts: int | None = None, force: bool = False) -> dict:
    """Write `num` successful demos to a new dataset `out` (--force: replace the dataset there); returns counts
    of what was kept and what was skipped."""
    from mani_skill.examples.motionplanning.panda.run import MP_SOLUTIONS

    cfg.validate()
    get_task(cfg.task)
    if cfg.task not in MP_SOLUTIONS:
        raise UserError(f"ManiSkill has no motion-planning solution for {cfg.task}")
    max_attempts = max_attempts or 3 * min(num, MAX_DEMOS) + 10
    _check_counts(cfg, num, seed_start, workers, max_attempts)
    out = Path(out)
    if not force and _holds_episodes(out):
        raise UserError(f"{out} already holds episodes; pass --force to replace them or choose a new --out")
    with RunDir(out, what="an episode dataset", force=force, replaceable=DATASET_ENTRIES):
        return _generate(cfg, num, out, seed_start, workers, max_attempts)


def _holds_episodes(out: Path) -> bool:
    try:
        return any((out / "episodes").glob("episode_*.h5"))
    except OSError:  # not a directory, a name too long: RunDir says which
        return False


def _generate(cfg: EnvConfig, num: int, out: Path, seed_start: int, workers: int, max_attempts: int) -> dict:
    seeds = range(seed_start, seed_start + max_attempts)
    writer = None
    counts = {"kept": 0, "plan_failed": 0, "conversion_failed": 0, "attempts": 0}
    bar = progress_bar(total=num, desc=f"demos {cfg.task}", unit="demo")
    ctx = mp.get_context("spawn")
    pool = ctx.Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(_worker, [(cfg.to_dict(), s) for s in seeds]) if pool else (
            plan_and_convert(cfg, s) for s in seeds)
        for r in results:
            counts["attempts"] += 1
            if r.ok:
                if writer is None:
                    writer = EpisodeWriter(out, spec=r.spec, meta={"task": cfg.task, "env_config": cfg.to_dict(),
                                                      "generator": "maniskill-motion-planning"})
                writer.write(r.episode, index=counts["kept"])
                counts["kept"] += 1
                bar.update(1)
            else:
                key = "conversion_failed" if r.reason == "conversion failed" else "plan_failed"
                counts[key] += 1
            bar.set_postfix(failed=counts["plan_failed"] + counts["conversion_failed"])
            if counts["kept"] >= num:
                break
    finally:
        bar.close()
        if pool:
            pool.terminate()
    if counts["kept"] < num:
        raise UserError(f"only {counts['kept']} of {num} demos succeeded in {counts['attempts']} attempts; they are "
                        f"kept in {out}; run again with a new --out and --seed-start {seed_start + max_attempts}")
    return counts
