#!/usr/bin/env python
"""SFT training throughput (samples/s) of FlowVLA on CPU, on synthetic data shaped like PickCube RGB.

One optimizer step = flow-matching loss (model.flow_matching_loss) + backward + gradient clipping + AdamW, with the
trainer's AdamW settings (sim_trainer/sft/trainer.py). Data loading, augmentation and EMA are excluded unless
--trainer-extras is given (then DrQ random shift and the EMA update are timed too, as in the trainer loop).

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

import numpy as np
import torch
from common import command_line, machine_info

from sim_trainer.data.normalize import NormStats, Stats
from sim_trainer.models.config import SIZES, ModelConfig
from sim_trainer.models.flow_vla import FlowVLA
from sim_trainer.models.tokenizer import tokenize

# PickCube-v1, obs_mode rgb, pd_joint_delta_pos (see docs/datasets.md)
CAMERA, IMAGE_SIZE, STATE_DIM, ACTION_DIM = "base_camera", 64, 29, 8
INSTRUCTION = "pick up the red cube and move it to the goal"


def random_norm(rng: np.random.Generator) -> NormStats:
    return NormStats(Stats.of(rng.normal(size=(1000, STATE_DIM))), Stats.of(rng.uniform(-1, 1, (1000, ACTION_DIM))))


def synthetic_batches(n: int, batch: int, horizon: int, rng: np.random.Generator) -> list[dict]:
    out = []
    for _ in range(n):
        out.append({
            "images": {CAMERA: torch.from_numpy(rng.integers(0, 256, (batch, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8))},
            "state": torch.from_numpy(rng.normal(size=(batch, STATE_DIM)).astype(np.float32)),
            "actions": torch.from_numpy(rng.uniform(-1, 1, (batch, horizon, ACTION_DIM)).astype(np.float32)),
            "valid": torch.ones(batch, horizon, dtype=torch.bool),
        })
    return out


def bench_size(size: str, args: argparse.Namespace) -> dict:
    from sim_trainer.sft.data import random_shift
    from sim_trainer.sft.trainer import EMA

    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    cfg = ModelConfig.from_size(size, camera_names=(CAMERA,), image_size=IMAGE_SIZE, state_dim=STATE_DIM,
                                action_dim=ACTION_DIM, horizon=args.horizon)
    model = FlowVLA(cfg, random_norm(rng))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "pos" in name or "embed" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 1e-4}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95))
    ema = EMA(model, 0.999) if args.trainer_extras else None
    batches = synthetic_batches(4, args.batch_size, args.horizon, rng)
    text = tokenize(INSTRUCTION, cfg.max_text_len).expand(args.batch_size, -1)
    model.train()

    def step(i: int) -> float:
        b = batches[i % len(batches)]
        t0 = time.perf_counter()
        images = b["images"]
        if args.trainer_extras:
            images = {k: random_shift(v, 4, gen) for k, v in images.items()}
        loss = model.flow_matching_loss(images, b["state"], text, b["actions"], valid=b["valid"], generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if ema is not None:
            ema.update(model, i)
        loss.item()  # the trainer reads the loss for logging; this also ends the step
        return time.perf_counter() - t0

    for i in range(args.warmup):
        step(i)
    times = [step(args.warmup + i) for i in range(args.steps)]
    total = sum(times)
    return {
        "size": size,
        "params": model.num_parameters(),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "s_per_step_mean": total / len(times),
        "s_per_step_p50": statistics.median(times),
        "s_per_step_min": min(times),
        "samples_per_s": args.batch_size * len(times) / total,
        "samples_per_s_p50": args.batch_size / statistics.median(times),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=sorted(SIZES), help="model sizes")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per size")
    p.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps before timing")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--horizon", type=int, default=16, help="action chunk length H")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores, as sim-trainer)")
    p.add_argument("--trainer-extras", action="store_true", help="also time DrQ random shift and the EMA update")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        p.error("--steps and --batch-size must be positive, --warmup non-negative")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)

    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    machine = machine_info()
    results = []
    for size in args.sizes:
        print(f"[sft_throughput] {size}: {args.warmup} warm-up + {args.steps} timed steps ...", file=sys.stderr)
        results.append(bench_size(size, args))

    print("## SFT throughput (CPU, synthetic PickCube-RGB-shaped data)\n")
    print(f"- command: `{command_line()}`")
    print(f"- date: {date}")
    print(f"- machine: {machine['platform']}, {machine['processor']}, {machine['cpu_count']} CPUs, "
          f"torch {machine['torch']} ({machine['torch_threads']} threads), Python {machine['python']}")
    print(f"- data: 1 camera `{CAMERA}` {IMAGE_SIZE}x{IMAGE_SIZE} RGB, state_dim {STATE_DIM}, action_dim "
          f"{ACTION_DIM}, horizon {args.horizon}; step = loss + backward + clip + AdamW"
          + (" + random shift + EMA" if args.trainer_extras else "") + "\n")
    print("| size | params | batch | timed steps | s/step (mean) | s/step (p50) | samples/s (mean) | samples/s (p50) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['size']} | {r['params'] / 1e6:.2f} M | {r['batch_size']} | {r['steps']} | "
              f"{r['s_per_step_mean']:.3f} | {r['s_per_step_p50']:.3f} | {r['samples_per_s']:.1f} | "
              f"{r['samples_per_s_p50']:.1f} |")
    print()
    summary = {"benchmark": "sft_throughput", "date": date, "command": command_line(), "machine": machine,
               "trainer_extras": args.trainer_extras, "horizon": args.horizon, "results": results}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
