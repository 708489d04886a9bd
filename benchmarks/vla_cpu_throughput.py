#!/usr/bin/env python
"""CPU throughput of the tiny pi0 / pi0.5 / SmolVLA backbones next to our small FlowVLA: SFT samples/s and RL
env steps/s.

SFT: optimizer steps (flow-matching loss + backward + clip + AdamW) on synthetic PickCube-RGB-shaped batches
(one 64 x 64 camera, resized inside the backbones to their 32 x 32). RL: `sim-trainer rl` (PPO, Flow-Noise) on
real ManiSkill PickCube-v1 state observations from a freshly initialised checkpoint of each model, its
env_steps_per_s read from metrics.jsonl (rollout + update, the run's wall clock).

Prints a Markdown table, then one line of JSON (the last line of stdout). `--smoke` runs a few steps only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import cli, command_line, machine_info

from sim_trainer.data.normalize import NormStats, Stats
from sim_trainer.models.backbones import tiny_backbone
from sim_trainer.models.checkpoint import save_checkpoint
from sim_trainer.models.config import ModelConfig
from sim_trainer.models.flow_vla import FlowVLA

MODELS = ("flowvla-small", "pi0-tiny", "pi05-tiny", "smolvla-tiny")
CAMERA, IMAGE_SIZE, HORIZON, EXEC = "base_camera", 64, 16, 8
INSTRUCTION = "pick up the red cube and move it to the goal"


def build(name: str, cameras: tuple[str, ...], state_dim: int, action_dim: int, norm: NormStats):
    if name == "flowvla-small":
        cfg = ModelConfig.from_size("small", camera_names=cameras, image_size=IMAGE_SIZE if cameras else 0,
                                    state_dim=state_dim, action_dim=action_dim, horizon=HORIZON, exec_steps=EXEC,
                                    num_steps=4)
        return FlowVLA(cfg, norm)
    return tiny_backbone(name, cameras, state_dim, action_dim, HORIZON, EXEC, 4, norm)


def random_norm(state_dim: int, action_dim: int, rng: np.random.Generator) -> NormStats:
    return NormStats(Stats.of(rng.normal(size=(500, state_dim))), Stats.of(rng.uniform(-1, 1, (500, action_dim))))


def sft_samples_per_s(name: str, steps: int, batch: int) -> float:
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    state_dim, action_dim = 29, 8
    model = build(name, (CAMERA,), state_dim, action_dim, random_norm(state_dim, action_dim, rng)).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    text = model.tokenize([INSTRUCTION]).expand(batch, -1)
    images = {CAMERA: torch.from_numpy(rng.integers(0, 256, (batch, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8))}
    state = torch.from_numpy(rng.normal(size=(batch, state_dim)).astype(np.float32))
    actions = torch.from_numpy(rng.uniform(-1, 1, (batch, HORIZON, action_dim)).astype(np.float32))
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        loss = model.flow_matching_loss(images, state, text, actions, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t0)


def rl_env_steps_per_s(name: str, work: Path, env_steps: int, threads: int) -> float:
    from sim_trainer.envs.make import probe_spec
    from sim_trainer.envs.spec import EnvConfig

    spec = probe_spec(EnvConfig(task="PickCube-v1", obs_mode="state"))
    norm = random_norm(spec.state_dim, spec.action_dim, np.random.default_rng(0))
    ckpt = save_checkpoint(work / f"{name}_init", build(name, (), spec.state_dim, spec.action_dim, norm), spec, norm)
    out = work / f"{name}_rl"
    cli("rl", "--ckpt", str(ckpt), "--out", str(out), "--algorithm", "ppo", "--noise", "flow_noise",
        "--num-envs", "2", "--rollout-chunks", "4", "--minibatch", "16", "--epochs", "2", "--num-steps", "4",
        "--total-env-steps", str(env_steps), "--eval-episodes", "1", "--eval-envs", "1", "--threads", str(threads))
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["env_steps_per_s"] for r in rows if "env_steps_per_s" in r]
    return float(np.mean(rates))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--sft-steps", type=int, default=20, help="timed SFT optimizer steps per model")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rl-env-steps", type=int, default=640, help="RL env-step budget per model (64 per update)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--smoke", action="store_true", help="2 SFT steps at batch 4 and 128 RL env steps per model")
    args = p.parse_args(argv)
    if args.smoke:
        args.sft_steps, args.batch_size, args.rl_env_steps = 2, 4, 128
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            print(f"[vla_cpu_throughput] {name} ...", file=sys.stderr)
            results.append({"model": name, "sft_samples_per_s": sft_samples_per_s(name, args.sft_steps,
                                                                                   args.batch_size),
                            "rl_env_steps_per_s": rl_env_steps_per_s(name, Path(tmp), args.rl_env_steps, threads)})
    machine = machine_info()
    print("## SFT and RL throughput of the tiny backbones (CPU)\n")
    print(f"- command: `{command_line()}`")
    print(f"- machine: {machine['platform']}, {machine['cpu_count']} CPUs, {threads} torch threads\n")
    print("| model | SFT samples/s | RL env steps/s |")
    print("|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['sft_samples_per_s']:.1f} | {r['rl_env_steps_per_s']:.1f} |")
    print(json.dumps({"benchmark": "vla_cpu_throughput", "args": vars(args), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
