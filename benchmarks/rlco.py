#!/usr/bin/env python
"""Sim-real co-training (RL-Co) with the real-proxy domain standing in for the real robot (state observations).

Arms, all from the same demos and seeds:
1. real-only SFT      : SFT on N real-proxy demos
2. mixed SFT          : SFT on sim demos + N real-proxy demos (ratio --mix)
3. mixed SFT -> RL    : PPO + Flow-Noise in sim from (2), no anchor
4. RL-Co              : the same RL with the flow-matching anchor on the N real-proxy demos (beta --beta)
Each is evaluated on held-out seeds in the real-proxy domain and in sim (Wilson 95%). Real-proxy envs are never
used for RL rollouts. Prints a Markdown table; writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

from common import command_line, machine_info


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "sim_trainer.cli", *args], check=True)


def evaluate(ckpt: Path, domain: str | None, episodes: int, out: Path) -> dict:
    extra = ["--domain", domain] if domain else []
    cli("eval", "--ckpt", str(ckpt), "--episodes", str(episodes), "--envs", "2", "--threads", "1", "--out", str(out),
        *extra)
    return json.loads((out / "eval.json").read_text())["summary"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="PushCube-v1")
    p.add_argument("--sim-data", default="data/pushcube_state20", help="sim demos (state observations)")
    p.add_argument("--real", type=int, default=10, help="number of real-proxy demos N")
    p.add_argument("--real-seed-start", type=int, default=500, help="real-proxy demo seeds (disjoint from sim's)")
    p.add_argument("--mix", type=float, nargs=2, default=(0.5, 0.5), help="sim, real sampling ratio for mixed SFT")
    p.add_argument("--sft-steps", type=int, default=2000)
    p.add_argument("--rl-preset", default="configs/rl_pushcube_state_cpu.yaml")
    p.add_argument("--rl-budget", type=int, default=60_000)
    p.add_argument("--beta", type=float, default=0.2)
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--out", default="outputs/bench_rlco")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    real = out / f"real_proxy_demos_{a.real}"
    if not real.exists():
        cli("demos", "--task", a.task, "-n", str(a.real), "--obs-mode", "state", "--domain", "real_proxy",
            "--seed-start", str(a.real_seed_start), "--out", str(real))
    sft = ["--size", "small", "--steps", str(a.sft_steps), "--horizon", "16", "--exec-steps", "8",
           "--num-steps", "4", "--threads", "1"]
    arms = {"real_only_sft": out / "real_only_sft", "mixed_sft": out / "mixed_sft",
            "mixed_sft_rl": out / "mixed_sft_rl", "rl_co": out / "rl_co"}
    if not (arms["real_only_sft"] / "config.json").exists():
        cli("sft", "--data", str(real), "--out", str(arms["real_only_sft"]), *sft)
    if not (arms["mixed_sft"] / "config.json").exists():
        cli("sft", "--data", a.sim_data, "--data", str(real), "--mix", *map(str, a.mix),
            "--out", str(arms["mixed_sft"]), *sft)
    rl = ["rl", "--config", a.rl_preset, "--ckpt", str(arms["mixed_sft"]), "--total-env-steps", str(a.rl_budget),
          "--threads", "1"]
    if not (arms["mixed_sft_rl"] / "rl_state.json").exists():
        cli(*rl, "--out", str(arms["mixed_sft_rl"]))
    if not (arms["rl_co"] / "rl_state.json").exists():
        cli(*rl, "--out", str(arms["rl_co"]), "--cotrain-data", str(real), "--cotrain-weight", str(a.beta))
    results = {"machine": machine_info(), "command": command_line(), "date": datetime.date.today().isoformat(),
               "args": vars(a), "arms": {}}
    for name, ckpt in arms.items():
        results["arms"][name] = {
            "real_proxy": evaluate(ckpt, "real_proxy", a.episodes, out / f"eval_{name}_real_proxy"),
            "sim": evaluate(ckpt, None, a.episodes, out / f"eval_{name}_sim"),
        }
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))

    def pct(s: dict) -> str:
        lo, hi = s["success_once_wilson95"]
        return f"{100 * s['success_once']:.0f}% [{100 * lo:.0f}-{100 * hi:.0f}]"

    print(f"| arm (N={a.real} real-proxy demos) | real-proxy success | sim success |")
    print("|---|---:|---:|")
    for name, r in results["arms"].items():
        print(f"| {name} | {pct(r['real_proxy'])} | {pct(r['sim'])} |")


if __name__ == "__main__":
    main()
