#!/usr/bin/env python
"""Entropic risk (`--risk-beta B`): risk-seeking vs neutral vs averse PPO, success and the worst decile of returns.

Setting: the CPU preset (configs/rl_pushcube_state_cpu.yaml: PPO + Flow-Noise, sparse reward, state PushCube-v1)
from the few-shot state SFT checkpoint (configs/sft_pushcube_state_fewshot.yaml on 20 motion-planned demos; made
here if missing), once per B in --betas and per seed in --seeds. Rollouts run in the plain sim, as every RL run
does. Every policy, and the SFT start, is then evaluated deterministically on the same held-out seeds in the plain
sim and in each --domains entry, by default the real-proxy dynamics half (configs/domain_real_proxy_dynamics.yaml:
friction x1.3, object mass x1.5, one control step of action latency, state noise 1e-3): a dynamics shift the policy
never trained in. Its returns vary with the start (cube and goal poses) and the state noise. For B < 0, the
entropic objective equals min over Q of E_Q[return] + KL(Q || P) / |B|, so it is robust to a bounded shift of the
outcome distribution, and a shifted domain is the test of that.

Scale of B: training returns are the sparse success, in [0, 1] (PPO discounts them per chunk step). With B = +-2
the certainty equivalent of a 50% success chance is (1/B) log(0.5 + 0.5 e^B) = 0.72 / 0.28 instead of 0.5, and the
best outcome weighs e^2 = 7.4 times the worst. That is a clear tilt that still keeps every episode in play;
|B| = 10 would give 0.93 / 0.07, nearly the max or the min alone. (GRPO is refused with sparse rewards and B != 0:
a transform of 0/1 returns does nothing after the group normalisation.)

Evaluation returns are ManiSkill's normalized dense reward summed over the whole horizon (evaluation never ends an
episode early), in [0, horizon]. Success is the env's success flag, as in every evaluation. The worst decile is the
mean of the lowest 10% of the returns (CVaR 10%), pooled over seeds and per seed. Finished runs and evaluations
are reused, so an interrupted benchmark continues. Prints a Markdown table and writes OUT/results.json and
OUT/return_cdf.png (the returns' empirical CDF per domain, pooled over seeds).

Full size (the defaults): 3 B x 3 seeds x 100k env steps (about 20 min per run on 2 cores, 3 h in all) and
100 episodes per evaluation. `--smoke` runs a tiny version of every step (2 demos, 20 SFT steps, 2 RL updates of
2 envs, one seed, 4 episodes) into outputs/bench_rl_risk_smoke: 4 min of CPU time (11 min wall on 2 shared
cores).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
from pathlib import Path

import numpy as np
from common import cli, command_line, machine_info, rl_finished

SMOKE = {"num_demos": 2, "sft_steps": 20, "seeds": [0], "rl_budget": 64, "episodes": 4,
         "out": "outputs/bench_rl_risk_smoke"}
SMOKE_RL = ["--num-envs", "2", "--rollout-chunks", "2", "--critic-warmup", "0"]


def ensure_sft(a: argparse.Namespace) -> Path:
    """The few-shot state SFT checkpoint: made from (made) demos if it does not exist."""
    sft = Path(a.sft_ckpt)
    if (sft / "config.json").exists():
        return sft
    if not Path(a.demos).exists():
        cli("demos", "--task", "PushCube-v1", "-n", str(a.num_demos), "--obs-mode", "state", "--out", a.demos,
            "--workers", "1")
    steps = ["--steps", str(a.sft_steps)] if a.sft_steps else []
    cli("sft", "--config", "configs/sft_pushcube_state_fewshot.yaml", "--data", a.demos, "--out", str(sft),
        "--threads", str(a.threads), *steps)
    return sft


def train(a: argparse.Namespace, sft: Path, beta: float, seed: int) -> Path:
    run = Path(a.out) / f"rl_beta{beta:+g}_seed{seed}"
    if not rl_finished(run, a.rl_budget):  # an interrupted run continues where it stopped
        resume = ["--resume"] if (run / "rl_state.json").exists() else []
        cli("rl", "--config", a.rl_preset, "--ckpt", str(sft), "--out", str(run), "--risk-beta", str(beta),
            "--seed", str(seed), "--total-env-steps", str(a.rl_budget), "--threads", str(a.threads),
            "--eval-every", "0", "--eval-episodes", "1", "--eval-envs", "1",  # evaluated below instead
            *(SMOKE_RL if a.smoke else []), *resume)
    return run


def evaluate(ckpt: Path, domain: str, a: argparse.Namespace) -> dict:
    """Per-episode outcomes (dense returns) in the plain sim or a domain; cached in OUT/evals."""
    trained = f"_{a.rl_budget}steps" if ckpt.name.startswith("rl_") else ""  # a longer run is evaluated anew
    path = Path(a.out) / "evals" / f"{ckpt.name}{trained}_{Path(domain).stem}_{a.episodes}ep.json"
    if not path.exists():
        from policy_runtime.artifacts import atomic_write_text
        from sim_trainer.envs.spec import EnvConfig
        from sim_trainer.evaluate.rollout import evaluate as run_eval
        from sim_trainer.models.checkpoint import load_checkpoint
        from sim_trainer.policy import ChunkPolicy

        loaded = load_checkpoint(ckpt)
        env = EnvConfig.for_policy(loaded.spec, reward_mode="normalized_dense",
                                   domain=None if domain == "sim" else domain)
        res = run_eval(ChunkPolicy(loaded.model, loaded.spec), env, a.episodes, a.eval_envs, record_video=False,
                       progress=False)
        path.parent.mkdir(exist_ok=True)
        atomic_write_text(path, json.dumps(res.to_dict()))
    return json.loads(path.read_text())


def worst_decile(returns: list[float]) -> float:
    """Mean of the lowest 10% of the returns (at least one): CVaR at 10%."""
    r = np.sort(np.asarray(returns))
    return float(r[:max(1, math.ceil(0.1 * len(r)))].mean())


def cell(evals: dict[int, dict]) -> dict:
    """One setting in one domain: per seed success (Wilson 95%) and worst decile, and both over all seeds."""
    per_seed = {}
    for seed, ev in evals.items():
        s = ev["summary"]
        per_seed[seed] = {"success_once": s["success_once"], "wilson95": s["success_once_wilson95"],
                          "worst_decile": worst_decile([e["ret"] for e in ev["episodes"]]),
                          "mean_return": s["mean_return"]}
    pooled = [e["ret"] for ev in evals.values() for e in ev["episodes"]]
    return {"seeds": per_seed, "success_mean": float(np.mean([c["success_once"] for c in per_seed.values()])),
            "worst_decile": worst_decile(pooled), "mean_return": float(np.mean(pooled))}


def plot_returns(returns: dict[str, dict[str, list[float]]], path: Path) -> None:
    """Empirical CDF of the evaluation returns pooled over seeds, one panel per domain: the left tail is the risk."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(next(iter(returns.values())))
    fig, axes = plt.subplots(1, len(domains), figsize=(6 * len(domains), 4), squeeze=False)
    for ax, domain in zip(axes[0], domains, strict=True):
        for setting, by_domain in returns.items():
            r = np.sort(by_domain[domain])
            ax.step(r, np.arange(1, len(r) + 1) / len(r), where="post", label=f"{setting} ({len(r)} episodes)")
        ax.axhline(0.1, color="grey", lw=0.8, ls=":")
        ax.set(title=Path(domain).stem, xlabel="evaluation return (normalized dense, summed)",
               ylabel="fraction of episodes with return <= x")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(results: dict) -> str:
    rows = ["| setting | domain | success per seed [Wilson 95%] | mean success | worst-decile return, pooled "
            "(per seed) | mean return |", "|---|---|---|---:|---|---:|"]
    for setting, domains in results["cells"].items():
        for domain, c in domains.items():
            seeds = "; ".join(f"s{k}: {100 * v['success_once']:.0f}% [{100 * v['wilson95'][0]:.0f}-"
                              f"{100 * v['wilson95'][1]:.0f}]" for k, v in c["seeds"].items())
            worst = ", ".join(f"{v['worst_decile']:.1f}" for v in c["seeds"].values())
            rows.append(f"| {setting} | {Path(domain).stem} | {seeds} | {100 * c['success_mean']:.0f}% | "
                        f"{c['worst_decile']:.1f} ({worst}) | {c['mean_return']:.1f} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--betas", type=float, nargs="+", default=[2.0, 0.0, -2.0],
                   help="risk_beta values, one setting each (> 0 risk-seeking, < 0 risk-averse)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="RL seeds, every setting once per seed")
    p.add_argument("--domains", nargs="+", default=["sim", "configs/domain_real_proxy_dynamics.yaml"],
                   help="evaluation domains: 'sim', 'real_proxy' or domain YAMLs")
    p.add_argument("--sft-ckpt", default="checkpoints/pushcube_state_fewshot",
                   help="start checkpoint (made if missing)")
    p.add_argument("--demos", default="data/pushcube_state20", help="demos for the start checkpoint (made if missing)")
    p.add_argument("--num-demos", type=int, default=20)
    p.add_argument("--sft-steps", type=int, default=0, help="SFT steps if the start is made (0: the config's 3000)")
    p.add_argument("--rl-preset", default="configs/rl_pushcube_state_cpu.yaml")
    p.add_argument("--rl-budget", type=int, default=100_000, help="env steps per RL run")
    p.add_argument("--episodes", type=int, default=100, help="held-out episodes per evaluation")
    p.add_argument("--eval-envs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each training process")
    p.add_argument("--out", default="outputs/bench_rl_risk")
    p.add_argument("--smoke", action="store_true", help="a tiny run of every step (overrides the sizes and --out)")
    a = p.parse_args()
    if a.smoke:
        vars(a).update(SMOKE, demos=f"{SMOKE['out']}/demos", sft_ckpt=f"{SMOKE['out']}/sft")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    sft = ensure_sft(a)
    runs = {"SFT start": {0: sft}}
    for beta in a.betas:
        runs[f"B={beta:+g}"] = {seed: train(a, sft, beta, seed) for seed in a.seeds}
    results = {"machine": machine_info(), "command": command_line(), "date": datetime.date.today().isoformat(),
               "args": vars(a), "cells": {}}
    returns: dict[str, dict[str, list[float]]] = {}
    for setting, by_seed in runs.items():
        evals = {d: {s: evaluate(ck, d, a) for s, ck in by_seed.items()} for d in a.domains}
        results["cells"][setting] = {d: cell(by_domain) for d, by_domain in evals.items()}
        returns[setting] = {d: [e["ret"] for ev in by_domain.values() for e in ev["episodes"]]
                            for d, by_domain in evals.items()}
        (Path(a.out) / "results.json").write_text(json.dumps(results, indent=1))
    plot_returns(returns, Path(a.out) / "return_cdf.png")
    print(table(results))


if __name__ == "__main__":
    main()
