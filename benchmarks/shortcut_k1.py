#!/usr/bin/env python
"""Shortcut models vs rectified flow at K=1: few-shot state PushCube, SFT then RL (ReinFlow noise), over seeds.

For every seed and both SFT objectives (configs/sft_pushcube_state_fewshot.yaml: rectified flow, and
configs/sft_pushcube_state_fewshot_shortcut.yaml: shortcut, the same steps and data):
1. SFT on the motion-planned demos (generated once: `sim-trainer demos --task PushCube-v1 -n N --obs-mode state`).
2. `sim-trainer eval` at K=1, K=2 and K=10 on the held-out seeds.
3. RL at K=1 with the ReinFlow noise network (the CPU RL preset, --noise reinflow --num-steps 1), same seed.
4. `sim-trainer eval` of the RL checkpoint at K=1.
Each cell: success per seed with its Wilson 95% interval, and the mean over seeds with the Wilson interval of the
pooled episodes. Finished SFT and RL runs and their evaluations are reused (an interrupted RL run resumes), so
seeds can run as concurrent processes (--seeds 0, --seeds 1, ...) and a last call with every seed prints the
table. Prints a Markdown table and writes OUT/results.json. The full size (3 seeds x 2 objectives x 3000 SFT steps
+ 100k RL env steps, 100 eval episodes per cell) takes many CPU hours; --smoke runs a minutes-long miniature of
every stage.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from common import cli, command_line, machine_info, pct, rl_finished
from rl_cpu import evaluate

from policy_runtime.stats import wilson_interval
from policy_runtime.yaml_io import load_yaml_mapping

PRESETS = {"flow": "configs/sft_pushcube_state_fewshot.yaml",
           "shortcut": "configs/sft_pushcube_state_fewshot_shortcut.yaml"}
SFT_KS = (1, 2, 10)
# --smoke: every stage at a size that runs in minutes on a CPU (numbers meaningless, the pipeline exercised)
SMOKE = {"demos": 2, "seeds": [0], "sft_steps": 20, "episodes": 2, "rl_budget": 64}
SMOKE_RL_FLAGS = ["--num-envs", "2", "--rollout-chunks", "2", "--minibatch", "8", "--epochs", "1",
                  "--critic-warmup", "0", "--eval-episodes", "1", "--eval-envs", "1"]


def sft_finished(run: Path, steps: int) -> bool:
    state = run / "trainer_state.json"
    return state.exists() and json.loads(state.read_text())["step"] >= steps


def evaluated(ckpt: Path, k: int, episodes: int, out: Path) -> dict:
    """rl_cpu's evaluation, reused when it is newer than the checkpoint and has as many episodes: per-seed
    processes and the final all-seeds table then share the evaluations instead of repeating them."""
    done = out / "eval.json"
    if done.exists() and done.stat().st_mtime > (ckpt / "model.safetensors").stat().st_mtime:
        summary = json.loads(done.read_text())["summary"]
        if summary["episodes"] == episodes:
            return summary
    return evaluate(str(ckpt), k, episodes, out)


def run_seed(a: argparse.Namespace, objective: str, seed: int, data: Path, out: Path) -> dict:
    """SFT, evaluation at every K, RL at K=1 and its evaluation for one (objective, seed); returns the summaries."""
    sft = out / f"sft_{objective}_seed{seed}"
    if not sft_finished(sft, a.sft_steps):
        resume = ["--resume"] if (sft / "trainer_state.json").exists() else []
        cli("sft", "--config", PRESETS[objective], "--data", str(data), "--out", str(sft), "--steps",
            str(a.sft_steps), "--seed", str(seed), "--threads", "1", *resume)
    cell = {f"sft_k{k}": evaluated(sft, k, a.episodes, out / f"eval_{sft.name}_k{k}") for k in SFT_KS}
    if a.no_rl:
        return cell
    rl = out / f"rl_{objective}_seed{seed}"
    if not rl_finished(rl, a.rl_budget):
        resume = ["--resume"] if (rl / "rl_state.json").exists() else []
        cli("rl", "--config", a.rl_preset, "--ckpt", str(sft), "--out", str(rl), "--noise", "reinflow",
            "--num-steps", "1", "--total-env-steps", str(a.rl_budget), "--seed", str(seed), "--threads", "1",
            *a.rl_flags, *resume)
    cell["rl_k1"] = evaluated(rl, 1, a.episodes, out / f"eval_{rl.name}_k1")
    return cell


def pooled(summaries: list[dict]) -> str:
    """Mean success over seeds, with the Wilson interval of all their episodes together."""
    n = sum(s["episodes"] for s in summaries)
    k = round(sum(s["success_once"] * s["episodes"] for s in summaries))
    lo, hi = wilson_interval(k, n)
    return f"{100 * k / n:.0f}% [{100 * lo:.0f}-{100 * hi:.0f}]"


def table(results: dict, seeds: list[int]) -> str:
    """One row per (objective, seed) and a pooled row per objective; the RL column only where RL ran (not --no-rl)."""
    headers = {**{f"sft_k{k}": f"SFT, K={k}" for k in SFT_KS}, "rl_k1": "SFT + RL (ReinFlow), K=1"}
    ran = next(iter(next(iter(results.values())).values()))  # the cells of the first (objective, seed)
    columns = [c for c in headers if c in ran]
    titles = [headers[c] for c in columns]
    lines = ["| objective | seed | " + " | ".join(titles) + " |", "|---|---|" + "---|" * len(columns)]
    for objective, by_seed in results.items():
        for seed in seeds:
            lines.append(f"| {objective} | {seed} | " + " | ".join(pct(by_seed[seed][c]) for c in columns) + " |")
        lines.append(f"| {objective} | mean | "
                     + " | ".join(pooled([by_seed[s][c] for s in seeds]) for c in columns) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="Success is success_once on held-out seeds (sim-trainer eval's default).")
    p.add_argument("--demos", type=int, default=20, help="motion-planned demos (the few-shot setting: 20)")
    p.add_argument("--data", help="demo dataset (default: data/pushcube_state<demos>; generated if missing)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="SFT and RL seeds")
    p.add_argument("--objectives", nargs="+", choices=list(PRESETS), default=list(PRESETS),
                   help="SFT objectives to run (default: both)")
    p.add_argument("--sft-steps", type=int, help="SFT steps for both objectives (default: the flow preset's)")
    p.add_argument("--episodes", type=int, default=100, help="held-out eval episodes per cell")
    p.add_argument("--rl-preset", default="configs/rl_pushcube_state_cpu.yaml")
    p.add_argument("--rl-budget", type=int, default=100_000, help="RL env steps per run")
    p.add_argument("--no-rl", action="store_true", help="SFT and its evaluations only (e.g. for an SFT-steps check)")
    p.add_argument("--out", default="outputs/bench_shortcut_k1")
    p.add_argument("--smoke", action="store_true", help="a miniature of every stage: " + ", ".join(
        f"{k}={v}" for k, v in SMOKE.items()) + ", RL " + " ".join(SMOKE_RL_FLAGS))
    a = p.parse_args()
    a.rl_flags = []
    if a.smoke:
        vars(a).update(SMOKE, rl_flags=SMOKE_RL_FLAGS)
    a.sft_steps = a.sft_steps or int(load_yaml_mapping(PRESETS["flow"], "preset")["steps"])
    data = Path(a.data or f"data/pushcube_state{a.demos}")
    if not data.exists():
        cli("demos", "--task", "PushCube-v1", "-n", str(a.demos), "--obs-mode", "state", "--out", str(data))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine_info(), "command": command_line(), "date": datetime.date.today().isoformat(),
              "args": {k: v for k, v in vars(a).items()}, "results": {}}
    for objective in a.objectives:
        report["results"][objective] = {}
        for seed in a.seeds:
            report["results"][objective][seed] = run_seed(a, objective, seed, data, out)
            (out / "results.json").write_text(json.dumps(report, indent=1))
    print(table(report["results"], a.seeds))


if __name__ == "__main__":
    main()
