#!/usr/bin/env python
"""Evaluation overhead of our env stack: env steps/s through sim_trainer divided by raw ManiSkill steps/s.

Measured in one process, on one CPU env (physx_cpu), in interleaved rounds (raw, ours, ours + policy, raw, ...);
each figure is the median over the rounds. Reset time is excluded everywhere (a reset happens every `horizon`
steps, as in evaluation, outside the timed region).

- raw:        gym.make(task, num_envs=1, obs_mode='state_dict' (or 'rgb'), control_mode=...) stepped with zero
              actions. By default the other settings match what our stack passes to gym.make (reward mode,
              horizon, CPU sim/render backends, camera resolution) so that only the wrapper cost differs;
              --plain-baseline uses ManiSkill's defaults for them instead.
- ours/zero:  make_vec_env(EnvConfig(task, obs_mode), 1) (an in-process SyncVectorEnv) stepped with the same zero
              actions, through the observation adapter and numpy -> torch conversion.
- ours/eval:  `sim_trainer.evaluate.rollout.evaluate` itself (what `sim-trainer eval` runs): a ChunkPolicy
              (randomly initialised FlowVLA, --policy-size) samples a chunk every C steps and its actions are
              executed; its own env-stepping clock gives steps/s. Its actions move the arm, unlike the zero
              actions of the other paths, which can change the physics cost a little.

Prints a Markdown table, then one line of JSON (the last line of stdout).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import warnings

import numpy as np
import torch
from common import command_line, machine_info

STATE_TARGET = 0.8  # ours/raw steps/s for state observations


def make_raw_env(cfg, plain: bool):
    import gymnasium as gym
    import mani_skill.envs  # noqa: F401  (registers the tasks)

    ms_obs_mode = "rgb" if cfg.obs_mode == "rgb" else "state_dict"
    if plain:
        return gym.make(cfg.task, obs_mode=ms_obs_mode, control_mode=cfg.control_mode, num_envs=1)
    return gym.make(cfg.task, num_envs=1, obs_mode=ms_obs_mode, control_mode=cfg.control_mode,
                    reward_mode=cfg.reward_mode, sim_backend="physx_cpu", render_backend="cpu",
                    sensor_configs={"width": cfg.image_size, "height": cfg.image_size},
                    max_episode_steps=cfg.horizon)


def time_steps(reset, step, n: int, horizon: int, seed: int) -> float:
    """Steps/s of `step()` alone over n steps, calling `reset(seed)` (untimed) every `horizon` steps."""
    elapsed, t = 0.0, horizon
    for _ in range(n):
        if t == horizon:
            reset(seed)
            seed, t = seed + 1, 0
        t0 = time.perf_counter()
        step()
        elapsed += time.perf_counter() - t0
        t += 1
    return n / elapsed


def build_policy(spec, args):
    from sim_trainer.data.normalize import NormStats, Stats
    from sim_trainer.models.config import ModelConfig
    from sim_trainer.models.flow_vla import FlowVLA
    from sim_trainer.policy import ChunkPolicy

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    cfg = ModelConfig.from_size(args.policy_size, camera_names=tuple(c.name for c in spec.cameras),
                                image_size=spec.cameras[0].height if spec.cameras else 0, state_dim=spec.state_dim,
                                action_dim=spec.action_dim, horizon=args.horizon, exec_steps=args.exec_steps,
                                num_steps=args.num_steps)
    norm = NormStats(Stats.of(rng.normal(size=(1000, spec.state_dim))),
                     Stats.of(rng.uniform(-1, 1, (1000, spec.action_dim))))
    return ChunkPolicy(FlowVLA(cfg, norm), spec)


def bench_mode(obs_mode: str, args: argparse.Namespace) -> dict:
    from sim_trainer.envs.spec import EnvConfig
    from sim_trainer.envs.vec_env import make_vec_env
    from sim_trainer.evaluate.rollout import evaluate

    cfg = EnvConfig(task=args.task, obs_mode=obs_mode, image_size=args.image_size).validate()
    horizon = cfg.horizon
    raw = make_raw_env(cfg, args.plain_baseline)
    venv = make_vec_env(cfg, 1)
    try:
        spec = venv.spec
        policy = build_policy(spec, args)
        zero_raw, zero_ours = np.zeros(spec.action_dim, dtype=np.float32), torch.zeros(1, spec.action_dim)
        raw_path = (lambda seed: raw.reset(seed=seed), lambda: raw.step(zero_raw))
        ours_path = (lambda seed: venv.reset([seed]), lambda: venv.step(zero_ours))
        warm = min(args.warmup, args.steps)
        if warm:
            time_steps(*raw_path, warm, horizon, 0)
            time_steps(*ours_path, warm, horizon, 0)
        rounds: dict[str, list[float]] = {"raw": [], "ours_zero": [], "eval": [], "policy_ms": []}
        episodes = max(1, args.steps // horizon)
        for r in range(args.rounds):
            print(f"[eval_overhead] {obs_mode}: round {r + 1}/{args.rounds} ...", file=sys.stderr)
            rounds["raw"].append(time_steps(*raw_path, args.steps, horizon, 0))
            rounds["ours_zero"].append(time_steps(*ours_path, args.steps, horizon, 0))
            result = evaluate(policy, cfg, episodes, 1, seed_start=0, record_video=False, progress=False)
            rounds["eval"].append(result.env_steps_per_s)
            rounds["policy_ms"].append(result.policy_ms_per_chunk)
    finally:
        venv.close()
        raw.close()
    med = {k: statistics.median(v) for k, v in rounds.items()}
    per_round_ratio = [o / r for o, r in zip(rounds["ours_zero"], rounds["raw"], strict=True)]
    out = {
        "obs_mode": obs_mode,
        "horizon": horizon,
        "state_dim": spec.state_dim,
        "cameras": [c.name for c in spec.cameras],
        "median_steps_per_s": {k: med[k] for k in ("raw", "ours_zero", "eval")},
        "policy_ms_per_chunk_median": med["policy_ms"],
        "ratio_ours_zero": med["ours_zero"] / med["raw"],
        "ratio_eval": med["eval"] / med["raw"],
        "ratio_ours_zero_per_round": per_round_ratio,
        "rounds": rounds,
    }
    if obs_mode == "state":
        out["target"] = STATE_TARGET
        out["target_met"] = out["ratio_ours_zero"] >= STATE_TARGET
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="PickCube-v1")
    p.add_argument("--steps", type=int, default=300, help="timed env steps per path per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps per path before the first round")
    p.add_argument("--obs-mode", nargs="+", default=["state"], choices=("state", "rgb"),
                   help="observation modes to measure (e.g. --obs-mode state rgb)")
    p.add_argument("--image-size", type=int, default=64, help="camera resolution for rgb")
    p.add_argument("--policy-size", default="tiny", choices=("tiny", "small", "base"),
                   help="FlowVLA size of the policy in the loop")
    p.add_argument("--horizon", type=int, default=16, help="policy chunk length H")
    p.add_argument("--exec-steps", type=int, default=8, help="actions executed per chunk C")
    p.add_argument("--num-steps", type=int, default=10, help="denoising steps K")
    p.add_argument("--plain-baseline", action="store_true",
                   help="raw env with ManiSkill's defaults for everything but obs_mode/control_mode/num_envs")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores, as sim-trainer)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.rounds < 1:
        p.error("--steps and --rounds must be positive")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    warnings.filterwarnings("ignore")

    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    machine = machine_info()
    results = [bench_mode(m, args) for m in args.obs_mode]

    print(f"## Evaluation overhead ({args.task}, 1 CPU env, median of {args.rounds} interleaved rounds)\n")
    print(f"- command: `{command_line()}`")
    print(f"- date: {date}")
    print(f"- machine: {machine['platform']}, {machine['processor']}, {machine['cpu_count']} CPUs, "
          f"torch {machine['torch']} ({machine['torch_threads']} threads), Python {machine['python']}")
    print(f"- {args.steps} timed steps per path per round, resets excluded; baseline: "
          + ("ManiSkill defaults" if args.plain_baseline else "settings matched to our stack")
          + f"; eval policy: {args.policy_size} FlowVLA, H={args.horizon}, C={args.exec_steps}, K={args.num_steps}\n")
    print("| obs mode | path | steps/s (median) | per round | ratio to raw |")
    print("|---|---|---:|---|---:|")
    labels = [("raw", "raw ManiSkill, zero actions"), ("ours_zero", "make_vec_env, zero actions"),
              ("eval", "sim_trainer evaluate(), env stepping")]
    for r in results:
        for key, label in labels:
            sps = r["median_steps_per_s"][key]
            per = ", ".join(f"{x:.0f}" for x in r["rounds"][key])
            ratio = "1.00" if key == "raw" else f"{r[f'ratio_{key}']:.2f}"
            if key == "ours_zero" and "target" in r:
                ratio += f" ({'meets' if r['target_met'] else 'below'} target {r['target']})"
            print(f"| {r['obs_mode']} | {label} | {sps:.1f} | {per} | {ratio} |")
    print()
    for r in results:
        print(f"- {r['obs_mode']}: policy {r['policy_ms_per_chunk_median']:.1f} ms per chunk (median); "
              f"state_dim {r['state_dim']}, cameras {r['cameras'] or 'none'}, horizon {r['horizon']}")
    print()
    summary = {"benchmark": "eval_overhead", "date": date, "command": command_line(), "machine": machine,
               "task": args.task, "steps": args.steps, "rounds": args.rounds,
               "plain_baseline": args.plain_baseline,
               "policy": {"size": args.policy_size, "horizon": args.horizon, "exec_steps": args.exec_steps,
                          "num_steps": args.num_steps},
               "results": results}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
