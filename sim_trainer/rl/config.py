"""RL run configuration: one dataclass, loaded from a YAML preset and overridden by flags, checked up front."""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from pathlib import Path

from sim_trainer.errors import UserError
from sim_trainer.rl.policy import VALUE_INPUTS
from sim_trainer.rl.samplers import NOISE_METHODS, SDE_MODES
from sim_trainer.yaml_config import load_yaml_mapping

ALGORITHMS = ("ppo", "grpo")
LOGPROB_LEVELS = ("token", "action", "chunk")
REWARDS = ("sparse", "normalized_dense")


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
        def one_of(name: str, value: str, options: tuple[str, ...]) -> None:
            if value not in options:
                raise UserError(f"unknown {name} {value!r}; choose one of {', '.join(options)}")

        one_of("algorithm", self.algorithm, ALGORITHMS)
        one_of("noise method", self.noise, NOISE_METHODS)
        one_of("sde_mode", self.sde_mode, SDE_MODES)
        one_of("logprob granularity", self.logprob, LOGPROB_LEVELS)
        one_of("value_input", self.value_input, VALUE_INPUTS)
        one_of("reward", self.reward, REWARDS)
        if not self.ckpt:
            raise UserError("give the SFT checkpoint to start from with --ckpt")
        if not Path(self.ckpt).is_dir():
            raise UserError(f"checkpoint {self.ckpt} does not exist or is not a directory")
        if not self.out:
            raise UserError("give a run directory with --out")
        if self.num_steps < 1:
            raise UserError(f"number of denoising steps must be >= 1, got K={self.num_steps}")
        if self.exec_steps is not None and self.exec_steps < 1:
            raise UserError(f"exec_steps must be >= 1, got C={self.exec_steps}")
        if not 0 < self.std_min <= self.std_max:
            raise UserError(f"need 0 < std_min <= std_max, got [{self.std_min}, {self.std_max}]")
        if self.noise_level <= 0:
            raise UserError("noise_level must be positive")
        for name in ("num_envs", "rollout_chunks", "epochs", "minibatch", "total_env_steps", "save_every",
                     "eval_episodes", "eval_envs"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1")
        if self.algorithm == "grpo" and (self.group_size < 2 or self.num_envs % self.group_size):
            raise UserError(f"GRPO needs group_size >= 2 dividing num_envs ({self.num_envs}), got {self.group_size}")
        if self.algorithm == "grpo" and self.critic_warmup:  # a preset's PPO setting must not waste GRPO rollouts
            print(f"warning: critic_warmup={self.critic_warmup} ignored: GRPO has no critic to warm up",
                  file=sys.stderr)
            self.critic_warmup = 0
        if not 0 < self.gamma <= 1 or not 0 <= self.gae_lambda <= 1:
            raise UserError("need 0 < gamma <= 1 and 0 <= gae_lambda <= 1")
        if self.cotrain_weight < 0 or self.cotrain_batch < 1:
            raise UserError("cotrain_weight must be >= 0 and cotrain_batch >= 1")
        if self.cotrain_data is not None and not Path(self.cotrain_data).is_dir():
            raise UserError(f"co-training dataset {self.cotrain_data} does not exist or is not a directory")
        if self.clip <= 0:
            raise UserError("clip must be positive")
        if self.target_kl is not None and self.target_kl <= 0:
            raise UserError("target_kl must be positive (leave it out for no early stop)")
        return self


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
