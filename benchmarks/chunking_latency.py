#!/usr/bin/env python
"""Chunk execution strategies under injected inference latency (virtual time, real ManiSkill).

For each strategy and latency: success with a Wilson interval and mean |jerk| of the commanded arm motion,
on the same held-out seeds. The policy runs on the PyTorch backend (guided RTC needs gradients).
Prints a Markdown table, then one line of JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import warnings

import torch
from common import command_line, machine_info

from policy_runtime.chunking import STRATEGIES
from sim_trainer.envs.spec import EnvConfig
from sim_trainer.evaluate.latency import run_strategy, torch_infer
from sim_trainer.evaluate.rollout import EVAL_SEED_START
from sim_trainer.models.checkpoint import load_checkpoint
from sim_trainer.policy import ChunkPolicy


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="checkpoints/pushcube_rgb_small")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    p.add_argument("--latencies-ms", nargs="+", type=int, default=[0, 100, 300])
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--envs", type=int, default=2)
    p.add_argument("--seed-start", type=int, default=EVAL_SEED_START)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_checkpoint(args.ckpt)
    spec = loaded.spec
    policy = ChunkPolicy(loaded.model, spec)
    cfg = EnvConfig.for_policy(spec)
    rows = []
    for latency in args.latencies_ms:
        for strategy in args.strategies:
            infer = torch_infer(policy, torch.Generator().manual_seed(0))
            rows.append(run_strategy(infer, policy.horizon, policy.exec_steps, cfg, strategy, latency / 1000,
                                     args.episodes, args.envs, args.seed_start))
            print(json.dumps(rows[-1]), file=sys.stderr)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    m = machine_info()
    print(f"## Chunk execution under injected latency ({spec.task}, {args.ckpt})\n")
    print(f"- command: `{command_line()}`\n- date: {date}\n- machine: {m['platform']}, {m['cpu_count']} CPUs, "
          f"torch {m['torch']}\n- H={policy.horizon}, C={policy.exec_steps}, K={policy.num_steps}, "
          f"{spec.control_hz:.0f} Hz, {args.episodes} episodes per cell, seeds from {args.seed_start}\n")
    print("| latency | strategy | delay (steps) | success | 95% CI | mean abs jerk (rad/s^3) | hold fraction |")
    print("|---:|---|---:|---:|---|---:|---:|")
    for r in rows:
        lo, hi = r["success_wilson95"]
        print(f"| {r['latency_ms']} ms | {r['strategy']} | {r['delay_steps']} | {r['success']:.0%} | "
              f"{lo:.0%}-{hi:.0%} | {r['mean_abs_jerk']:.1f} | {r['hold_fraction']:.2f} |")
    print()
    print(json.dumps({"benchmark": "chunking_latency", "date": date, "command": command_line(), "machine": m,
                      "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
