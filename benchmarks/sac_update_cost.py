#!/usr/bin/env python
"""Where SAC Flow's update time goes on a backbone actor: the critic's TD target, a critic update, an actor update.

SAC Flow from an SFT checkpoint (`--ckpt`, rl/backbone_actor.py) pays for the K-step chain in three places: the TD
target samples a' from the actor for every critic update (K backbone passes, no gradient), the actor update
backpropagates through all K steps, and the optional pull towards the starting policy (`--sac-bc-coef`) runs the
chain's step means again with the trained and the frozen model. This times each on one minibatch of random
transitions (the cost does not depend on the data), with and without the pull, so the update-to-data ratio and
policy delay of a preset can be chosen from measured costs. Prints a Markdown table, then one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from common import command_line, machine_info

from sim_trainer.data.normalize import NormStats
from sim_trainer.models.checkpoint import load_checkpoint
from sim_trainer.rl.backbone_actor import BackboneFlowActor, with_sac_velocity
from sim_trainer.rl.sac import SAC, SACSettings


def milliseconds(fn, repeats: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats * 1000


def measure(args: argparse.Namespace, bc_coef: float) -> dict:
    torch.manual_seed(0)
    loaded = load_checkpoint(args.ckpt)
    norm = NormStats.load(f"{args.ckpt}/norm_stats.json")
    model = with_sac_velocity(loaded.model, norm, args.velocity)
    spec = loaded.spec
    low, high = torch.tensor(spec.action_low), torch.tensor(spec.action_high)
    actor = BackboneFlowActor(model, spec.instruction, low, high, num_steps=args.num_steps, bc_coef=bc_coef)
    sac = SAC(actor, spec.state_dim, args.exec_steps, SACSettings(hidden=args.hidden, critic_warmup=0, policy_delay=1))
    b, s, c, a = args.minibatch, spec.state_dim, args.exec_steps, spec.action_dim
    batch = {"obs": torch.randn(b, s), "chunk": torch.rand(b, c, a) * 2 - 1, "reward": torch.rand(b),
             "next_obs": torch.randn(b, s), "done": torch.zeros(b, dtype=torch.bool),
             "truncated": torch.zeros(b, dtype=torch.bool), "steps": torch.ones(b, dtype=torch.long)}

    def critic_update() -> None:
        target = sac.td_target(batch)
        q1, q2 = sac.critic(batch["obs"], batch["chunk"])
        loss = (q1 - target).square().mean() + (q2 - target).square().mean()
        sac._step(loss, *[list(sac.critic.parameters())] * 2)

    return {"bc_coef": bc_coef,
            "td_target_ms": milliseconds(lambda: sac.td_target(batch), args.repeats),
            "critic_update_ms": milliseconds(critic_update, args.repeats),
            "actor_update_ms": milliseconds(lambda: sac._update_actor(batch["obs"], None), args.repeats)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="checkpoints/pushcube_state_fewshot", help="state-observation SFT checkpoint")
    p.add_argument("--velocity", default="flow_g", choices=["flow_g", "flow_t", "plain"])
    p.add_argument("--num-steps", type=int, default=4, help="K, as the SAC preset")
    p.add_argument("--exec-steps", type=int, default=8, help="C, the executed part the critic scores")
    p.add_argument("--minibatch", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256, help="critic and noise-head width")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--smoke", action="store_true", help="minibatch 4, one repeat")
    args = p.parse_args()
    if args.smoke:
        args.minibatch, args.repeats = 4, 1
    torch.set_num_threads(args.threads)
    rows = [measure(args, bc) for bc in (0.0, 1.0)]
    machine = machine_info()
    print(f"- command: `{command_line()}`\n- machine: {machine['platform']}, {machine['cpu_count']} CPUs, "
          f"{args.threads} torch thread(s)\n")
    print("| sac_bc_coef | TD target (a' from the actor) ms | critic update (with its target) ms | actor update ms |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['bc_coef']:g} | {r['td_target_ms']:.0f} | {r['critic_update_ms']:.0f} "
              f"| {r['actor_update_ms']:.0f} |")
    print(json.dumps({"benchmark": "sac_update_cost", "args": vars(args), "results": rows}))


if __name__ == "__main__":
    main()
