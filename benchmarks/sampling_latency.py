#!/usr/bin/env python
"""FlowVLA action-chunk sampling latency on CPU: encode the prefix once, then K Euler steps (batch 1).

Each timed call is model.sample_actions(images, state, text, noise, K) under torch.no_grad() with explicit noise,
on PickCube-RGB-shaped inputs (one 64x64 camera "base_camera", state_dim 29, action_dim 8), for every chunk length
H and number of denoising steps K. A "prefix only" row per H times model.encode_prefix alone (the part that does not
depend on K). Weights are random: latency does not depend on them.

Prints a Markdown table, then one line of JSON (the last line of stdout).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import numpy as np
import torch
from common import command_line, machine_info

from sim_trainer.data.normalize import NormStats, Stats
from sim_trainer.models.config import SIZES, ModelConfig
from sim_trainer.models.flow_vla import FlowVLA
from sim_trainer.models.tokenizer import tokenize

CAMERA, IMAGE_SIZE, STATE_DIM, ACTION_DIM = "base_camera", 64, 29, 8
INSTRUCTION = "pick up the red cube and move it to the goal"


def percentiles_ms(times: list[float]) -> dict:
    a = np.asarray(times) * 1000
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean()), "min_ms": float(a.min())}


def time_calls(fn, calls: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


@torch.no_grad()
def bench_horizon(size: str, horizon: int, ks: list[int], args: argparse.Namespace) -> list[dict]:
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    cfg = ModelConfig.from_size(size, camera_names=(CAMERA,), image_size=IMAGE_SIZE, state_dim=STATE_DIM,
                                action_dim=ACTION_DIM, horizon=horizon, exec_steps=min(8, horizon))
    norm = NormStats(Stats.of(rng.normal(size=(1000, STATE_DIM))), Stats.of(rng.uniform(-1, 1, (1000, ACTION_DIM))))
    model = FlowVLA(cfg, norm).eval()
    images = {CAMERA: torch.from_numpy(rng.integers(0, 256, (1, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8))}
    state = torch.from_numpy(rng.normal(size=(1, STATE_DIM)).astype(np.float32))
    text = tokenize(INSTRUCTION, cfg.max_text_len)[None]
    noise = torch.randn((1, horizon, ACTION_DIM), generator=torch.Generator().manual_seed(args.seed))
    rows = []
    times = time_calls(lambda: model.encode_prefix(images, state, text), args.calls, args.warmup)
    rows.append({"size": size, "params": model.num_parameters(), "horizon": horizon, "num_steps": 0,
                 "what": "prefix only", **percentiles_ms(times)})
    for k in ks:
        print(f"[sampling_latency] {size} H={horizon} K={k} ...", file=sys.stderr)
        times = time_calls(lambda k=k: model.sample_actions(images, state, text, noise, k), args.calls, args.warmup)
        rows.append({"size": size, "params": model.num_parameters(), "horizon": horizon, "num_steps": k,
                     "what": "sample_actions", **percentiles_ms(times)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small", choices=sorted(SIZES), help="model size")
    p.add_argument("--horizons", type=int, nargs="+", default=[8, 16], help="chunk lengths H")
    p.add_argument("--num-steps", type=int, nargs="+", default=[1, 2, 4, 10], help="denoising steps K")
    p.add_argument("--calls", type=int, default=200, help="timed calls per (H, K)")
    p.add_argument("--warmup", type=int, default=20, help="untimed calls per (H, K) before timing")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores, as sim-trainer)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.calls < 1 or args.warmup < 0 or min(args.horizons) < 1 or min(args.num_steps) < 1:
        p.error("--calls, --horizons and --num-steps must be positive, --warmup non-negative")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)

    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    machine = machine_info()
    rows = [r for h in args.horizons for r in bench_horizon(args.size, h, args.num_steps, args)]

    print(f"## Sampling latency ({args.size} FlowVLA, CPU, batch 1, torch.no_grad)\n")
    print(f"- command: `{command_line()}`")
    print(f"- date: {date}")
    print(f"- machine: {machine['platform']}, {machine['processor']}, {machine['cpu_count']} CPUs, "
          f"torch {machine['torch']} ({machine['torch_threads']} threads), Python {machine['python']}")
    print(f"- inputs: 1 camera `{CAMERA}` {IMAGE_SIZE}x{IMAGE_SIZE} RGB, state_dim {STATE_DIM}, action_dim "
          f"{ACTION_DIM}; {args.calls} timed calls after {args.warmup} warm-up calls per row; "
          f"{rows[0]['params'] / 1e6:.2f} M parameters\n")
    print("| H | K | call | p50 (ms) | p99 (ms) | mean (ms) | min (ms) |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        k = "-" if r["num_steps"] == 0 else str(r["num_steps"])
        call = "encode_prefix" if r["num_steps"] == 0 else "sample_actions"
        print(f"| {r['horizon']} | {k} | {call} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['mean_ms']:.2f} | "
              f"{r['min_ms']:.2f} |")
    print()
    summary = {"benchmark": "sampling_latency", "date": date, "command": command_line(), "machine": machine,
               "size": args.size, "calls": args.calls, "warmup": args.warmup, "results": rows}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
