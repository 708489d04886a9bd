#!/usr/bin/env python
"""SAC Flow from scratch: Flow-G vs Flow-T vs plain velocity vs Gaussian SAC, success against env steps.

Setting: the CPU preset configs/sac_flow_pushcube_state_cpu.yaml (state PushCube-v1, normalized dense reward,
training episodes that only the time limit ends, K = 4 flow steps, chunks of 4 joint-delta actions), once per
--velocities arm and per seed in --seeds, each with --budget env steps (the same for every arm; `gaussian` is
SAC with a tanh-Gaussian actor on the same code).
Every run evaluates its deterministic policy (the chain's mean path from x_0 = 0, or the Gaussian's mean) on the
same held-out seeds every --eval-every iterations and at its end; the table gives the final success per seed
with its Wilson 95% interval, their mean, the mean of each seed's last 3 evaluations (one 50-episode evaluation
swings by tens of points from the next), and the first env-step count at which each seed's evaluation reached --reach.
Finished runs are reused and an interrupted one is resumed (--resume), so the benchmark continues where it
stopped. Prints a Markdown table and writes OUT/results.json (with every evaluation) and OUT/learning_curves.png
(success against env steps).

Full size (the defaults): 4 arms x 3 seeds x 100k env steps, 50 episodes per evaluation. On the 2-core development
host, two runs at a time, a run took 10-29 min (BENCHMARKS.md section 17), so an arm of 3 seeds is about 35-65 min of
one core's share. `--smoke` runs every arm once for 96 env steps of 2 envs with 2 evaluation episodes, into
outputs/bench_sac_flow_smoke (about 1 min). `--preset configs/sac_flow_pushcube_state_sft_cpu.yaml` runs the arms from
the SFT checkpoint instead (flow_g, flow_t, plain; section 15); `--compare` adds finished PPO runs of
benchmarks/rl_cpu.py (same start, same evaluation seeds) to the table and plot, `--before` the start's success.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import numpy as np
from common import cli, command_line, machine_info
from rl_cpu import plot

SMOKE = {"seeds": [0], "budget": 96, "episodes": 2, "eval_every": 0, "out": "outputs/bench_sac_flow_smoke"}
SMOKE_RUN = ["--num-envs", "2", "--rollout-chunks", "3", "--max-episode-steps", "12", "--minibatch", "8",
             "--learning-starts", "8", "--sac-hidden", "32", "--buffer-size", "1000", "--eval-envs", "1"]


def finished(run: Path, budget: int) -> bool:
    state = run / "sac_state.json"
    return state.exists() and json.loads(state.read_text())["env_steps"] >= budget


def train(a: argparse.Namespace, velocity: str, seed: int) -> Path:
    run = Path(a.out) / f"{velocity}_seed{seed}"
    if not finished(run, a.budget):
        resume = ["--resume"] if (run / "sac_state.json").exists() else []
        cli("rl", "--config", a.preset, "--velocity", velocity, "--seed", str(seed), "--out", str(run),
            "--total-env-steps", str(a.budget), "--eval-episodes", str(a.episodes), "--eval-every", str(a.eval_every),
            "--threads", str(a.threads), *(SMOKE_RUN if a.smoke else []), *resume, *a.extra)
    return run


def evaluations(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{"env_steps": r["env_steps"], **r["eval"]} for r in rows if "eval" in r]


def cell(a: argparse.Namespace, runs: dict[int, Path]) -> dict:
    per_seed = {}
    for seed, run in runs.items():
        evals = evaluations(run)
        reached = next((e["env_steps"] for e in evals if e["success_once"] >= a.reach), None)
        per_seed[seed] = {"success_once": evals[-1]["success_once"], "wilson95": evals[-1]["success_once_wilson95"],
                          "last3": float(np.mean([e["success_once"] for e in evals[-3:]])),
                          "steps_to_reach": reached, "curve": [(e["env_steps"], e["success_once"]) for e in evals]}
    return {"seeds": per_seed, "success_mean": float(np.mean([c["success_once"] for c in per_seed.values()])),
            "last3_mean": float(np.mean([c["last3"] for c in per_seed.values()]))}


def table(results: dict, reach: float) -> str:
    rows = [f"| arm | final success per seed [Wilson 95%] | mean | mean of each seed's last 3 evaluations | "
            f"env steps to {100 * reach:.0f}% per seed |", "|---|---|---:|---:|---|"]
    for arm, c in results["cells"].items():
        seeds = "; ".join(f"s{k}: {100 * v['success_once']:.0f}% [{100 * v['wilson95'][0]:.0f}-"
                          f"{100 * v['wilson95'][1]:.0f}]" for k, v in c["seeds"].items())
        steps = ", ".join(str(v["steps_to_reach"] or "-") for v in c["seeds"].values())
        rows.append(f"| {arm} | {seeds} | {100 * c['success_mean']:.0f}% | {100 * c['last3_mean']:.0f}% | {steps} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--velocities", nargs="+", default=["flow_g", "flow_t", "plain", "gaussian"],
                   help="arms, one per --velocity")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds, every arm once per seed")
    p.add_argument("--preset", default="configs/sac_flow_pushcube_state_cpu.yaml")
    p.add_argument("--budget", type=int, default=100_000, help="env steps per run, the same for every arm")
    p.add_argument("--episodes", type=int, default=50, help="held-out episodes per evaluation")
    p.add_argument("--eval-every", type=int, default=25, help="iterations between evaluations (0: at the end)")
    p.add_argument("--reach", type=float, default=0.5, help="success level whose first env-step count is reported")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each training process")
    p.add_argument("--out", default="outputs/bench_sac_flow")
    p.add_argument("--smoke", action="store_true", help="a tiny run of every arm (overrides the sizes and --out)")
    p.add_argument("--report", action="store_true",
                   help="train nothing: the table and plot of the (arm, seed) runs in --out that reached --budget")
    p.add_argument("--compare", nargs="+", default=[], metavar="RUN",
                   help="finished `sim-trainer rl` runs named METHOD_seedS (e.g. benchmarks/rl_cpu.py's "
                        "outputs/bench_rl_seeds_tkl/ppo_flow_noise_seed0) tabled and drawn beside the arms")
    p.add_argument("--before", type=float, default=None, help="the start policy's success, drawn as a dashed line")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="more `sim-trainer rl` flags for every run (last; a variant belongs in its own --out)")
    a = p.parse_args()
    if a.smoke:
        vars(a).update(SMOKE)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    if a.report:
        runs = {v: {seed: run for seed in a.seeds if finished(run := Path(a.out) / f"{v}_seed{seed}", a.budget)}
                for v in a.velocities}
        runs = {v: by_seed for v, by_seed in runs.items() if by_seed}
    else:
        runs = {v: {seed: train(a, v, seed) for seed in a.seeds} for v in a.velocities}
    for run in map(Path, a.compare):
        method, seed = run.name.rsplit("_seed", 1)
        runs.setdefault(method, {})[int(seed)] = run
    results = {"machine": machine_info(), "command": command_line(), "date": datetime.date.today().isoformat(),
               "args": vars(a), "cells": {v: cell(a, by_seed) for v, by_seed in runs.items()}}
    (Path(a.out) / "results.json").write_text(json.dumps(results, indent=1))
    plot({f"{v}_seed{seed}": run for v, by_seed in runs.items() for seed, run in by_seed.items()}, a.before,
         Path(a.out) / "learning_curves.png", f"{a.episodes}, compared runs their own" if a.compare else a.episodes)
    print(table(results, a.reach))


if __name__ == "__main__":
    main()
