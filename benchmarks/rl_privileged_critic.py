#!/usr/bin/env python
"""Privileged critic on RGB PushCube at CPU scale: PPO with the prefix critic vs the privileged critic.

The actor sees the camera and the proprio state in both arms; the privileged critic (--value-input privileged)
reads the simulator's true state instead of the actor's pooled prefix. For every seed (--seeds, default 3), each
arm runs `sim-trainer rl --config PRESET` from the same SFT checkpoint with the same env-step budget; then:
1. success before (the start checkpoint, K as in the preset) and after each run on the same held-out seeds,
   Wilson 95% interval per seed, and the mean over seeds (with the pooled Wilson interval of all episodes);
2. the critic's explained variance (mean of the last 5 updates) and the run's training time (rollouts and
   updates, without its own evaluations).
Finished runs and evaluations are reused, so an interrupted benchmark picks up where it stopped.
Prints a Markdown table and writes OUT/results.json.

Full size (the default): 3 seeds x 2 arms x 12,288 env steps, 100 eval episodes; about an hour on an idle
2-core host (estimated from the smoke run's per-update timings).
Smoke (13 min on a loaded 2-core host): --budget 512 --episodes 4 --seeds 0 --extra --rollout-chunks 4
--critic-warmup 1 --eval-episodes 1 --eval-envs 1
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import numpy as np
from common import cli, command_line, machine_info
from rl_cpu import evaluate

from policy_runtime.stats import wilson_interval

ARMS = {"prefix_critic": ["--value-input", "prefix"], "privileged_critic": ["--value-input", "privileged"]}


def finished(run: Path, budget: int) -> bool:
    """Whether an RL run reached its env-step budget (its state is also saved mid-run)."""
    state = run / "rl_state.json"
    return state.exists() and json.loads(state.read_text())["env_steps"] >= budget


def evaluated(ckpt: str, k: int, episodes: int, out: Path) -> dict:
    """The evaluation summary in out, made now unless this benchmark made it already with as many episodes."""
    path = out / "eval.json"
    if path.exists():
        summary = json.loads(path.read_text())["summary"]
        if summary["episodes"] == episodes:
            return summary
    return evaluate(ckpt, k, episodes, out)


def run_summary(run: Path, last: int = 5) -> dict:
    """The critic's explained variance over the last updates, and the time spent in rollouts and updates."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in rows if "eval" not in r]
    ev = [r["explained_variance"] for r in updates if "explained_variance" in r]
    return {"explained_variance": float(np.nanmean(ev[-last:])) if ev else float("nan"),
            "train_s": sum(r["rollout_s"] + r["update_s"] for r in updates)}


def pct(successes: float, lo: float, hi: float) -> str:
    return f"{100 * successes:.0f}% [{100 * lo:.0f}-{100 * hi:.0f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--preset", default="configs/rl_pushcube_rgb_cpu.yaml", help="RL preset for both arms")
    p.add_argument("--ckpt", default="checkpoints/pushcube_rgb_small", help="RGB SFT checkpoint to start from")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="RL seeds, one run per arm each")
    p.add_argument("--budget", type=int, default=12_288, help="env steps per run (24 updates of the preset)")
    p.add_argument("--episodes", type=int, default=100, help="held-out eval episodes before and after")
    p.add_argument("--out", default="outputs/bench_rl_privileged_critic")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `sim-trainer rl` flags for all runs")
    a = p.parse_args()
    from policy_runtime.yaml_io import load_yaml_mapping

    k = int(load_yaml_mapping(a.preset, "preset").get("num_steps", 4))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": machine_info(), "command": command_line(), "date": datetime.date.today().isoformat(),
                     "preset": a.preset, "ckpt": a.ckpt, "budget": a.budget, "seeds": a.seeds}
    results["before"] = evaluated(a.ckpt, k, a.episodes, out / "eval_start")
    for arm, flags in ARMS.items():
        results[arm] = {}
        for seed in a.seeds:
            run = out / f"{arm}_seed{seed}"
            if not finished(run, a.budget):
                cli("rl", "--config", a.preset, "--ckpt", a.ckpt, "--out", str(run), "--seed", str(seed),
                    "--total-env-steps", str(a.budget), "--threads", "1", *flags, *a.extra,
                    *(["--resume"] if (run / "rl_state.json").exists() else []))
            results[arm][seed] = {"after": evaluated(str(run), k, a.episodes, out / f"eval_{arm}_seed{seed}"),
                                  **run_summary(run)}
            (out / "results.json").write_text(json.dumps(results, indent=1))

    before = results["before"]
    print(f"start {a.ckpt}: success {pct(before['success_once'], *before['success_once_wilson95'])} "
          f"over {before['episodes']} held-out episodes (K={k}); budget {a.budget} env steps per run")
    print("| critic | seed | success before | success after | gain (points) | critic explained var | training time |")
    print("|---|---|---|---|---|---|---|")
    for arm in ARMS:
        runs = results[arm]
        for seed, r in runs.items():
            s = r["after"]
            print(f"| {arm} | {seed} | {pct(before['success_once'], *before['success_once_wilson95'])} | "
                  f"{pct(s['success_once'], *s['success_once_wilson95'])} | "
                  f"{100 * (s['success_once'] - before['success_once']):+.0f} | {r['explained_variance']:.2f} | "
                  f"{r['train_s'] / 60:.1f} min |")
        rates = [r["after"]["success_once"] for r in runs.values()]
        wins = sum(round(r["after"]["success_once"] * r["after"]["episodes"]) for r in runs.values())
        n = sum(r["after"]["episodes"] for r in runs.values())
        mean = float(np.mean(rates))
        results[f"{arm}_mean"] = {"success_once": mean, "pooled_wilson95": list(wilson_interval(wins, n)),
                                  "gain": mean - before["success_once"]}
        print(f"| {arm} | mean of {len(rates)} | | {pct(mean, *wilson_interval(wins, n))} (pooled interval) | "
              f"{100 * (mean - before['success_once']):+.0f} | "
              f"{np.nanmean([r['explained_variance'] for r in runs.values()]):.2f} | |")
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
