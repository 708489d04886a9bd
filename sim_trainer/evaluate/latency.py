"""Chunk execution strategies under injected inference latency, in virtual time on the real simulator.

The simulator advances one control step per loop; a chunk requested at step t (from the observation of
step t) becomes available at step t + ceil(latency * control_hz). Meanwhile the executor decides what
runs; when it has nothing, the arm holds (zero deltas, gripper unchanged). All envs of a batch share
the same timing, so requests are batched into one policy call.

Smoothness: mean |jerk| of the commanded arm motion. With delta control each action moves the target by
0.1 * a (ManiSkill's +-0.1 rad or m bound), so jerk = 0.1 * control_hz**3 * |second difference of a|.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from policy_runtime.chunking import ChunkRequest, make_executor
from policy_runtime.stats import wilson_interval
from sim_trainer.envs.spec import EnvConfig
from sim_trainer.envs.vec_env import make_vec_env
from sim_trainer.models.rtc import guided_denoise, prefix_weights
from sim_trainer.policy import ChunkPolicy
from sim_trainer.progress import progress_bar

DELTA_BOUND = 0.1  # ManiSkill delta controllers: a normalised action of 1 moves the target by 0.1 rad / 0.1 m

InferFn = Callable[[dict, list[ChunkRequest]], np.ndarray]


def torch_infer(policy: ChunkPolicy, generator: torch.Generator, max_guidance: float = 5.0) -> InferFn:
    """Inference with the PyTorch model; requests that carry a leftover get guided RTC."""

    @torch.no_grad()
    def infer(obs: dict, reqs: list[ChunkRequest]) -> np.ndarray:
        if all(r.leftover is None for r in reqs):
            return policy.act(obs, generator).numpy()
        model, spec = policy.model, policy.spec
        b = obs["state"].shape[0]
        cache = model.encode_prefix(obs["images"], obs["state"].float(), policy.text.expand(b, -1))
        noise = torch.randn((b, policy.horizon, spec.action_dim), generator=generator)
        leftover = model.action_norm(torch.as_tensor(np.stack([r.leftover for r in reqs]), dtype=torch.float32))
        w = prefix_weights(policy.horizon, reqs[0].delay_steps, policy.exec_steps)
        x = guided_denoise(model, cache, noise, policy.num_steps, leftover, w, max_guidance)
        return torch.maximum(torch.minimum(model.action_norm.inverse(x), policy.high), policy.low).numpy()

    return infer


def run_strategy(infer: InferFn, horizon: int, exec_steps: int, cfg: EnvConfig, strategy: str, latency_s: float,
                 episodes: int, num_envs: int, seed_start: int, progress: bool = True) -> dict:
    venv = make_vec_env(cfg, num_envs)
    hz = venv.spec.control_hz
    delay = int(math.ceil(latency_s * hz - 1e-9))
    steps = cfg.horizon
    successes, jerks, holds = [], [], 0
    bar = progress_bar(total=episodes, desc=f"{strategy} @ {int(latency_s * 1000)} ms", show=progress)
    try:
        for start in range(0, episodes, num_envs):
            n = min(num_envs, episodes - start)
            obs = venv.reset([seed_start + start + i for i in range(num_envs)])
            execs = [make_executor(strategy, horizon, exec_steps, hz, latency_s) for _ in range(num_envs)]
            in_flight: list[tuple[int, list[ChunkRequest], np.ndarray]] = []
            last = np.zeros((num_envs, venv.spec.action_dim), np.float32)
            executed = np.zeros((steps, num_envs, venv.spec.action_dim), np.float32)
            success_any = np.zeros(num_envs, bool)
            for t in range(steps):
                for _, reqs, chunks in [f for f in in_flight if f[0] <= t]:
                    for i, (r, c) in enumerate(zip(reqs, chunks, strict=True)):
                        execs[i].on_chunk(c, r, t)
                in_flight = [f for f in in_flight if f[0] > t]
                reqs = [e.request(t) for e in execs]
                if reqs[0] is not None:  # identical timing across envs
                    chunks = infer(obs, reqs)
                    if delay == 0:
                        for i, (r, c) in enumerate(zip(reqs, chunks, strict=True)):
                            execs[i].on_chunk(c, r, t)
                    else:
                        in_flight.append((t + delay, reqs, chunks))
                actions = np.empty_like(last)
                for i, e in enumerate(execs):
                    a = e.action(t)
                    if a is None:
                        a = last[i].copy()
                        a[:-1] = 0.0  # hold: no arm motion, gripper keeps its command
                        holds += int(i < n)
                    actions[i] = a
                last, executed[t] = actions, actions
                res = venv.step(torch.from_numpy(actions))
                obs = res.obs
                success_any |= res.success.numpy()
            successes += success_any[:n].tolist()
            d2 = np.diff(executed[:, :n, :-1], n=2, axis=0)
            jerks.append(np.abs(d2).mean(axis=(0, 2)) * DELTA_BOUND * hz**3)
            bar.update(n)
    finally:
        bar.close()
        venv.close()
    k = int(sum(successes))
    return {"strategy": strategy, "latency_ms": round(latency_s * 1000), "delay_steps": delay,
            "episodes": len(successes), "success": k / len(successes),
            "success_wilson95": list(wilson_interval(k, len(successes))),
            "mean_abs_jerk": float(np.concatenate(jerks).mean()), "hold_fraction": holds / (len(successes) * steps)}
