#!/usr/bin/env python
"""RL on CPU: success before and after RL for several methods at an equal env-step budget.

1. Evaluate the SFT checkpoint on held-out seeds (EVAL_SEED_START..), K as in the RL preset.
2. For each seed (default 0, 1, 2) and method, run `sim-trainer rl --config PRESET --seed S` with the same
   budget; time the run.
3. Evaluate each RL checkpoint on the same held-out seeds; Wilson 95% interval per run, the mean gain per method.
4. Raw simulator throughput in the same session: the same CpuVecEnv (same number of env processes) stepped
   with random actions; the RL loop's env steps/s (rollout phase, and whole run) are given as fractions of it.
5. Learning curves (periodic eval success and training success vs env steps) as a PNG.

Prints a Markdown table and writes OUT/results.json and OUT/learning_curves.png.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from common import cli, command_line, machine_info, pct

METHODS = {
    "ppo_flow_noise": ["--algorithm", "ppo", "--noise", "flow_noise"],
    "ppo_flow_sde": ["--algorithm", "ppo", "--noise", "flow_sde"],
    "grpo_flow_noise": ["--algorithm", "grpo", "--noise", "flow_noise"],
}


def evaluate(ckpt: str, k: int, episodes: int, out: Path) -> dict:
    cli("eval", "--ckpt", ckpt, "--steps", str(k), "--episodes", str(episodes), "--envs", "2", "--out", str(out),
        "--threads", "1", "--force")  # a rerun of the benchmark replaces its own earlier evaluation
    return json.loads((out / "eval.json").read_text())["summary"]


def raw_throughput(task: str, num_envs: int, steps: int) -> float:
    from sim_trainer.envs.spec import EnvConfig
    from sim_trainer.envs.vec_env import make_vec_env

    venv = make_vec_env(EnvConfig(task=task, obs_mode="state"), num_envs)
    try:
        venv.reset(list(range(num_envs)))
        low, high = torch.tensor(venv.spec.action_low), torch.tensor(venv.spec.action_high)
        t0, n = time.perf_counter(), 0
        while n < steps:
            res = venv.step(low + (high - low) * torch.rand(num_envs, len(low)))
            n += num_envs
            done = (res.terminated | res.truncated).numpy()
            if done.any():
                venv.reset(list(range(num_envs)), mask=done)
        return n / (time.perf_counter() - t0)
    finally:
        venv.close()


def read_curve(run: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval" not in r], [r for r in rows if "eval" in r]


def plot(runs: dict[str, Path], before: float | None, path: Path, eval_episodes: int | str = 20) -> None:
    """Held-out success (left) and training success (right) against env steps, one colour per method, one line
    style per seed; `before` (the start's success, None from scratch) as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    methods = list(dict.fromkeys(name.split("_seed")[0] for name in runs))
    for name, run in runs.items():  # one colour per method, one line style per seed
        updates, evals = read_curve(run)
        style = {"color": f"C{methods.index(name.split('_seed')[0])}",
                 "ls": ["-", "--", ":", "-."][int(name.split("_seed")[1]) % 4] if "_seed" in name else "-"}
        xs = [e["env_steps"] for e in evals]
        ys = [e["eval"]["success_once"] for e in evals]
        axes[0].plot(xs, ys, marker="o", ms=3, label=name, **style)
        tx = [u["env_steps"] for u in updates if "train_success_once" in u]
        ty = [u["train_success_once"] for u in updates if "train_success_once" in u]
        if ty:
            w = min(10, len(ty))
            axes[1].plot(tx[w - 1:], np.convolve(ty, np.ones(w) / w, mode="valid"), label=name, **style)
    if before is not None:
        axes[0].axhline(before, color="gray", ls="--", label="SFT (100 eps)")
    axes[0].set(title=f"periodic eval (deterministic, {eval_episodes} eps)", xlabel="env steps", ylabel="success_once",
                ylim=(0, 1.02))
    axes[1].set(title="training episodes (stochastic, moving avg 10 updates)", xlabel="env steps",
                ylabel="success", ylim=(0, 1.02))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_one(name: str, seed: int, a: argparse.Namespace, k: int, raw: float, out: Path) -> dict:
    """One method at one seed: train (unless already done in OUT), evaluate on the held-out seeds."""
    run, eval_dir = out / f"{name}_seed{seed}", out / f"eval_{name}_seed{seed}"
    if (eval_dir / "eval.json").exists() and (run / "metrics.jsonl").exists():  # a rerun keeps finished cells
        return json.loads((out / "cells" / f"{name}_seed{seed}.json").read_text())
    t0 = time.perf_counter()
    cli("rl", "--config", a.preset, "--out", str(run), "--total-env-steps", str(a.budget), "--threads", "1",
        "--seed", str(seed), "--force", *METHODS[name], *a.extra)
    wall = time.perf_counter() - t0
    updates, _ = read_curve(run)
    rollout_sps = float(np.mean([u["env_steps_per_s"] for u in updates]))
    total_steps = updates[-1]["env_steps"]
    cell = {"method": name, "seed": seed, "run": str(run), "wall_s": wall, "env_steps": total_steps,
            "load_avg_1min_at_end": os.getloadavg()[0], "after": evaluate(str(run), k, a.episodes, eval_dir),
            "rollout_env_steps_per_s": rollout_sps, "run_env_steps_per_s": total_steps / wall,
            "rollout_fraction_of_raw": rollout_sps / raw, "run_fraction_of_raw": total_steps / wall / raw}
    (out / "cells").mkdir(exist_ok=True)
    (out / "cells" / f"{name}_seed{seed}.json").write_text(json.dumps(cell, indent=1))
    return cell


def print_table(results: dict, methods: list[str], seeds: list[int]) -> None:
    before = results["before"]
    print(f"raw simulator: {results['raw_env_steps_per_s']:.0f} env steps/s (CPU env processes, random actions)")
    print(f"success before RL (SFT checkpoint, {before['episodes']} held-out episodes): {pct(before)}\n")
    print("| method | seed | env steps | wall clock | success after [Wilson 95%] | gain (points) | "
          "rollout steps/s (of raw) | whole run steps/s (of raw) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in methods:
        gains = []
        for seed in seeds:
            r = results["cells"].get(f"{name}_seed{seed}")
            if r is None:
                continue
            gain = 100 * (r["after"]["success_once"] - before["success_once"])
            gains.append(gain)
            print(f"| {name} | {seed} | {r['env_steps']} | {r['wall_s'] / 60:.1f} min | {pct(r['after'])} | "
                  f"{gain:+.0f} | {r['rollout_env_steps_per_s']:.0f} ({r['rollout_fraction_of_raw']:.2f}) | "
                  f"{r['run_env_steps_per_s']:.0f} ({r['run_fraction_of_raw']:.2f}) |")
        if gains:
            print(f"| **{name}** | mean of {len(gains)} | | | | **{np.mean(gains):+.1f}** "
                  f"(min {min(gains):+.0f}) | | |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="configs/rl_pushcube_state_cpu.yaml")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                   help="RL seeds per method (one seed is an anecdote: report at least 3)")
    p.add_argument("--budget", type=int, default=100_000, help="env steps per run")
    p.add_argument("--episodes", type=int, default=100, help="held-out eval episodes before and after")
    p.add_argument("--out", default="outputs/bench_rl",
                   help="output dir; a rerun into the same dir keeps the (method, seed) cells already finished")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `sim-trainer rl` flags for all runs")
    a = p.parse_args()
    from policy_runtime.yaml_io import load_yaml_mapping

    preset = load_yaml_mapping(a.preset, "preset")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    k = int(preset.get("num_steps", 4))
    raw = raw_throughput("PushCube-v1", int(preset.get("num_envs", 8)), 4000)
    results = {"machine": machine_info(), "command": command_line(), "date": datetime.date.today().isoformat(),
               "preset": preset, "budget": a.budget, "raw_env_steps_per_s": raw, "seeds": a.seeds, "cells": {}}
    before_json = out / "eval_sft" / "eval.json"
    with (out / ".eval_sft.lock").open("w") as lock:  # one seed per process: the first evaluates, the rest wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        results["before"] = (json.loads(before_json.read_text())["summary"] if before_json.exists()
                             else evaluate(preset["ckpt"], k, a.episodes, out / "eval_sft"))
    for seed in a.seeds:  # seed-major: an interrupted sweep still has every method at the first seeds
        for name in a.methods:
            results["cells"][f"{name}_seed{seed}"] = run_one(name, seed, a, k, raw, out)
            (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    plot({c: Path(r["run"]) for c, r in results["cells"].items()}, results["before"]["success_once"],
         out / "learning_curves.png")
    print_table(results, a.methods, a.seeds)


if __name__ == "__main__":
    main()
