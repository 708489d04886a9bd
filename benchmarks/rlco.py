#!/usr/bin/env python
"""Sim-real co-training (RL-Co) with the real-proxy domain standing in for the real robot (state observations).

Arms, for each number N of real-proxy demos, all from the same demos and seeds:
1. real-only SFT      : SFT on N real-proxy demos
2. mixed SFT          : SFT on sim demos + N real-proxy demos (ratio --mix)
3. mixed SFT -> RL    : PPO + Flow-Noise in sim from (2), no anchor
4. RL-Co (beta b)     : the same RL with the flow-matching anchor on the N real-proxy demos, one arm per --betas
RL arms are repeated for every --rl-seeds entry (seed 0 unsuffixed, others `_seed<s>`), from the same Stage I.
Each is evaluated on held-out seeds in the real-proxy domain and in sim (Wilson 95%). Real-proxy envs are never
used for RL rollouts. The demos for a smaller N are a prefix of those for a larger N (same seed range), so the
data-efficiency curve compares nested datasets. Finished arms are reused; prints Markdown tables, writes
OUT/results.json and OUT/data_efficiency.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from common import cli, command_line, machine_info, pct, rl_finished

DOMAINS = ("real_proxy", "sim")


def evaluate(ckpt: Path, domain: str, episodes: int, out: Path) -> dict:
    if not (out / "eval.json").exists():
        extra = ["--domain", domain] if domain != "sim" else []
        cli("eval", "--ckpt", str(ckpt), "--episodes", str(episodes), "--envs", "2", "--threads", "1",
            "--out", str(out), *extra)
    return json.loads((out / "eval.json").read_text())["summary"]


def rl_runs(a: argparse.Namespace, real: Path) -> dict[str, tuple[int, list[str]]]:
    """RL arm name -> (seed, extra `sim-trainer rl` flags): plain RL and one RL-Co arm per beta, per RL seed."""
    runs: dict[str, tuple[int, list[str]]] = {}
    for seed in a.rl_seeds:
        suffix = f"_seed{seed}" if seed else ""
        runs[f"mixed_sft_rl{suffix}"] = (seed, [])
        for b in a.betas:
            runs[f"rl_co_beta{b:g}{suffix}"] = (seed, ["--cotrain-data", str(real), "--cotrain-weight", str(b)])
    return runs


def train_arms(a: argparse.Namespace, n: int, out: Path) -> dict[str, Path]:
    """Train (or reuse) every arm for N real-proxy demos; returns arm name -> checkpoint dir.

    With --report-only nothing is trained: the arms that exist are returned.
    """
    real = out / f"real_proxy_demos_{n}"
    runs = rl_runs(a, real)
    if a.report_only:
        sft = [name for name in ("real_only_sft", "mixed_sft") if (out / name / "config.json").exists()]
        return {name: out / name for name in sft + [r for r in runs if rl_finished(out / r, a.rl_budget)]}
    if not real.exists():
        cli("demos", "--task", a.task, "-n", str(n), "--obs-mode", "state", "--domain", "real_proxy",
            "--seed-start", str(a.real_seed_start), "--out", str(real))
    sft = ["--size", "small", "--steps", str(a.sft_steps), "--horizon", "16", "--exec-steps", "8",
           "--num-steps", "4", "--threads", "1"]
    arms = {"real_only_sft": out / "real_only_sft", "mixed_sft": out / "mixed_sft"}
    if not (arms["real_only_sft"] / "config.json").exists():
        cli("sft", "--data", str(real), "--out", str(arms["real_only_sft"]), *sft)
    if not (arms["mixed_sft"] / "config.json").exists():
        cli("sft", "--data", a.sim_data, "--data", str(real), "--mix", *map(str, a.mix),
            "--out", str(arms["mixed_sft"]), *sft)
    rl = ["rl", "--config", a.rl_preset, "--ckpt", str(arms["mixed_sft"]), "--total-env-steps", str(a.rl_budget),
          "--threads", "1"]
    for name, (seed, extra) in runs.items():
        arms[name] = out / name
        if not rl_finished(arms[name], a.rl_budget):  # an interrupted run continues where it stopped
            resume = ["--resume"] if (arms[name] / "rl_state.json").exists() else []
            cli(*rl, "--seed", str(seed), "--out", str(arms[name]), *extra, *resume)
    return arms


def plot(results: dict, path: Path) -> None:
    """Success vs N, one panel per domain, one line per arm, Wilson intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted(results["by_n"], key=int)
    arms = list(dict.fromkeys(arm for n in ns for arm in results["by_n"][n]))
    bases = list(dict.fromkeys(arm.split("_seed")[0] for arm in arms))  # a seed repeat shares its arm's colour
    colours = {base: f"C{i}" for i, base in enumerate(bases)}
    fig, axes = plt.subplots(1, len(DOMAINS), figsize=(11, 4.2), sharey=True)
    for ax, domain in zip(axes, DOMAINS, strict=True):
        for i, arm in enumerate(arms):
            have = [n for n in ns if arm in results["by_n"][n]]
            xs = [int(n) * (1 + 0.015 * (i - len(arms) / 2)) for n in have]  # small offsets keep bars apart
            ys, lo, hi = [], [], []
            for n in have:
                cell = results["by_n"][n][arm][domain]
                ys.append(100 * cell["success_once"])
                lo.append(ys[-1] - 100 * cell["success_once_wilson95"][0])
                hi.append(100 * cell["success_once_wilson95"][1] - ys[-1])
            base, _, seed = arm.partition("_seed")
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, color=colours[base],
                        linestyle="--" if seed else "-",
                        label=base.replace("_", " ") + (f" (RL seed {seed})" if seed else ""))
        ax.set_xscale("log")
        ax.set_xticks([int(n) for n in ns], [str(n) for n in ns])
        ax.minorticks_off()
        ax.set_xlabel("real-proxy demos N")
        ax.set_title(f"success in {domain.replace('_', '-')} ({results['args']['episodes']} episodes, Wilson 95%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("success %")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(arms), 4), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="PushCube-v1")
    p.add_argument("--sim-data", default="data/pushcube_state20", help="sim demos (state observations)")
    p.add_argument("--real", type=int, nargs="+", default=[10], help="numbers of real-proxy demos N (a sweep)")
    p.add_argument("--real-seed-start", type=int, default=500, help="real-proxy demo seeds (disjoint from sim's)")
    p.add_argument("--mix", type=float, nargs=2, default=(0.5, 0.5), help="sim, real sampling ratio for mixed SFT")
    p.add_argument("--sft-steps", type=int, default=2000)
    p.add_argument("--rl-preset", default="configs/rl_pushcube_state_cpu.yaml")
    p.add_argument("--rl-budget", type=int, default=60_000)
    p.add_argument("--betas", type=float, nargs="+", default=[0.2], help="RL-Co anchor weights, one arm each")
    p.add_argument("--rl-seeds", type=int, nargs="+", default=[0], help="RL seeds, the RL arms once per seed")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: evaluate (or reuse evaluations of) the arms that exist, tabulate, plot")
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--out", default="outputs/bench_rlco")
    a = p.parse_args()
    out = Path(a.out)
    results = {"machine": machine_info(), "command": command_line(), "date": datetime.date.today().isoformat(),
               "args": vars(a), "by_n": {}}
    for n in a.real:
        n_out = out / f"n{n}"
        n_out.mkdir(parents=True, exist_ok=True)
        arms = train_arms(a, n, n_out)
        cells = results["by_n"].setdefault(str(n), {})
        for name, ckpt in arms.items():
            cells[name] = {d: evaluate(ckpt, d, a.episodes, n_out / f"eval_{name}_{d}") for d in DOMAINS}
            (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    plot(results, out / "data_efficiency.png")

    for n, cells in sorted(results["by_n"].items(), key=lambda kv: int(kv[0])):
        print(f"\n| arm (N={n} real-proxy demos) | real-proxy success | sim success |")
        print("|---|---:|---:|")
        for name, r in cells.items():
            print(f"| {name} | {pct(r['real_proxy'])} | {pct(r['sim'])} |")


if __name__ == "__main__":
    main()
