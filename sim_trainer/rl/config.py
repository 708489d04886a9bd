"""RL run configuration: one dataclass, loaded from a YAML preset and overridden by flags, checked up front."""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from pathlib import Path

from policy_runtime.yaml_io import load_yaml_mapping
from sim_trainer.config_check import SEED_MAX, Range, check_fields, cpu_process_limit
from sim_trainer.errors import UserError
from sim_trainer.rl.policy import VALUE_INPUTS
from sim_trainer.rl.samplers import NOISE_METHODS, SDE_MODES

ALGORITHMS = ("ppo", "grpo")
LOGPROB_LEVELS = ("token", "action", "chunk")
REWARDS = ("sparse", "normalized_dense")
SIM_BACKENDS = ("physx_cpu", "physx_cuda")
# Every number's allowed range: a typo (a negative or NaN rate, a million envs) is refused before work.
RL_LIMITS = {
    "num_steps": Range(1, 100), "exec_steps": Range(1, 256), "noise_level": Range(0, 10, lo_open=True),
    "std_min": Range(0, 10, lo_open=True), "std_max": Range(0, 10, lo_open=True), "num_envs": Range(1, 16384),
    "rollout_chunks": Range(1, 4096), "group_size": Range(1, 16384), "total_env_steps": Range(1, 10**11),
    "gamma": Range(0, 1, lo_open=True), "gae_lambda": Range(0, 1), "clip": Range(0, 10, lo_open=True),
    "value_clip": Range(0, 1e6, lo_open=True), "huber_delta": Range(0, 1e6, lo_open=True), "ent_coef": Range(0, 10),
    "lr": Range(0, 1, lo_open=True), "value_lr": Range(0, 1, lo_open=True), "weight_decay": Range(0, 10),
    "critic_warmup": Range(0, 10**6), "epochs": Range(1, 100), "minibatch": Range(1, 65536),
    "target_kl": Range(0, 100, lo_open=True), "max_grad_norm": Range(0, 1e6, lo_open=True),
    "cotrain_weight": Range(0, 1000), "cotrain_batch": Range(1, 4096), "eval_every": Range(0, 10**6),
    "eval_episodes": Range(1, 10_000), "eval_envs": Range(1, 4096), "save_every": Range(1, 10**6),
    "seed": Range(0, SEED_MAX), "max_episode_steps": Range(1, 100_000),
}


@dataclass
class RLConfig:
    ckpt: str = ""  # the SFT checkpoint to start from
    out: str = ""  # run directory (checkpoint + trainer state + TensorBoard + metrics)
    task: str | None = None  # None: the checkpoint's task
    algorithm: str = "ppo"
    noise: str = "flow_noise"  # flow_noise | flow_sde | reinflow
    sde_mode: str = "mixed"
    num_steps: int = 4  # K, for training and evaluation alike
    exec_steps: int | None = None  # C executed actions per chunk; None: the checkpoint's
    noise_level: float = 0.5  # flow_sde a
    std_min: float = 0.08
    std_max: float = 0.16
    logprob: str = "chunk"  # ratio granularity
    value_input: str = "prefix"
    reward: str = "sparse"
    num_envs: int = 8
    rollout_chunks: int = 16  # PPO: chunk steps per env per rollout (GRPO: one whole episode per env)
    group_size: int = 4  # GRPO: envs sharing a reset seed
    grpo_filter: bool = True
    total_env_steps: int = 100_000
    gamma: float = 0.99  # per chunk step
    gae_lambda: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.2
    huber_delta: float = 10.0
    ent_coef: float = 0.005
    lr: float = 1e-4
    value_lr: float = 1e-3
    weight_decay: float = 0.0
    critic_warmup: int = 0  # updates that train only the value head (PPO; ignored with a warning for GRPO)
    epochs: int = 4
    minibatch: int = 64
    target_kl: float | None = None  # stop an update's remaining epochs once an epoch's mean approx KL exceeds it
    max_grad_norm: float = 1.0
    cotrain_data: str | None = None  # RL-Co: real(-proxy) episodes anchoring the policy with a flow-matching loss
    cotrain_weight: float = 0.2  # beta in L = L_RL + beta * L_SFT(real)
    cotrain_batch: int = 32  # real samples per RL minibatch
    freeze_vision: bool = False
    expert_only: bool = False  # train the action expert and heads only (prefix encoder frozen)
    eval_every: int = 0  # updates between evaluations (0: only at the end)
    eval_episodes: int = 20
    eval_envs: int = 2
    eval_domain: str | None = None  # also evaluate in this shifted domain (e.g. real_proxy); never used for rollouts
    save_every: int = 10  # updates
    seed: int = 0
    sim_backend: str = "physx_cpu"
    max_episode_steps: int | None = None  # None: the task's horizon
    resume: bool = False

    def validate(self) -> RLConfig:
        """Types and ranges of every field, whether it came from the YAML preset or from a flag."""
        check_fields(self, RL_LIMITS)

        def one_of(name: str, value: str, options: tuple[str, ...]) -> None:
            if value not in options:
                raise UserError(f"unknown {name} {value!r}; choose one of {', '.join(options)}")

        one_of("algorithm", self.algorithm, ALGORITHMS)
        one_of("noise method", self.noise, NOISE_METHODS)
        one_of("sde_mode", self.sde_mode, SDE_MODES)
        one_of("logprob granularity", self.logprob, LOGPROB_LEVELS)
        one_of("value_input", self.value_input, VALUE_INPUTS)
        one_of("reward", self.reward, REWARDS)
        one_of("sim_backend", self.sim_backend, SIM_BACKENDS)
        if not self.ckpt:
            raise UserError("give the SFT checkpoint to start from with --ckpt")
        _check_dir("checkpoint", self.ckpt)
        if not self.out:
            raise UserError("give a run directory with --out")
        if self.cotrain_data is not None:
            _check_dir("co-training dataset", self.cotrain_data)
        if self.sim_backend == "physx_cuda":
            import torch

            if not torch.cuda.is_available():
                raise UserError("sim_backend physx_cuda needs a CUDA GPU and this host has none; use physx_cpu")
        else:
            for name in ("num_envs", "eval_envs"):
                if getattr(self, name) > cpu_process_limit():
                    raise UserError(f"{name} {getattr(self, name)} exceeds {cpu_process_limit()}, the most CPU "
                                    "simulator processes for this machine (physx_cuda runs more in one process)")
        if not self.std_min <= self.std_max:
            raise UserError(f"need std_min <= std_max, got [{self.std_min}, {self.std_max}]")
        if self.algorithm == "grpo" and (self.group_size < 2 or self.num_envs % self.group_size):
            raise UserError(f"GRPO needs group_size >= 2 dividing num_envs ({self.num_envs}), got {self.group_size}")
        if self.algorithm == "grpo" and self.critic_warmup:  # a preset's PPO setting must not waste GRPO rollouts
            print(f"warning: critic_warmup={self.critic_warmup} ignored: GRPO has no critic to warm up",
                  file=sys.stderr)
            self.critic_warmup = 0
        return self


def _check_dir(what: str, path: str) -> None:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} {path} does not exist")
    if not p.is_dir():
        raise UserError(f"{what} {path} is a file, not a directory")


def load_rl_config(path: str | None, overrides: dict) -> RLConfig:
    """YAML preset (keys = RLConfig fields) with command-line overrides (None means: not given)."""
    values = load_yaml_mapping(path) if path else {}
    known = {f.name: f for f in fields(RLConfig)}
    unknown = set(values) - set(known)
    if unknown:
        raise UserError(f"unknown RL options in {path}: {', '.join(sorted(unknown))}")
    values |= {k: v for k, v in overrides.items() if v is not None and k in known}
    try:
        return RLConfig(**values).validate()
    except TypeError as e:
        raise UserError(f"bad RL config: {e}") from None
