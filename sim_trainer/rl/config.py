"""RL run configuration: one dataclass (preset keys and flags, see sim_trainer/config_flags.py), checked up front."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from policy_runtime.hub import is_hub_path, parse_hub_path
from sim_trainer.config_check import SEED_MAX, Range, check_fields, cpu_process_limit
from sim_trainer.config_flags import option
from sim_trainer.data.sources import source_path
from sim_trainer.errors import UserError
from sim_trainer.models.interface import groups_to_freeze
from sim_trainer.models.precision import FROZEN_DTYPE_HELP, PRECISION_HELP, check_precision
from sim_trainer.rl.flow_velocity import ACTORS, BACKBONE_VELOCITIES
from sim_trainer.rl.policy import VALUE_INPUTS
from sim_trainer.rl.samplers import NOISE_METHODS, SDE_MODES

ALGORITHMS = ("ppo", "grpo", "sac_flow")
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
    "seed": Range(0, SEED_MAX), "max_episode_steps": Range(1, 100_000), "risk_beta": Range(-50, 50),
    "sac_hidden": Range(1, 8192), "buffer_size": Range(1, 10**9), "tau": Range(0, 1, lo_open=True),
    "utd": Range(0, 1000, lo_open=True), "policy_delay": Range(1, 1000), "n_step": Range(1, 1000),
    "learning_starts": Range(0, 10**9), "target_entropy": Range(-1e6, 1e6), "alpha_init": Range(0, 100, lo_open=True),
    "sac_std_min": Range(0, 10, lo_open=True), "sac_std_max": Range(0, 10, lo_open=True),
    "sac_backbone_lr": Range(0, 1), "sac_bc_coef": Range(0, 1e6),
}


@dataclass
class RLConfig:
    """Every RL option: a preset key and a flag (`num_envs` -> `--num-envs`), help text as written here."""

    ckpt: str = option("", "SFT checkpoint to start from: a directory or hf://owner/repo[@revision][/subdir]")
    out: str = option("", "run directory (becomes a checkpoint; trainer state, metrics and TensorBoard in it)")
    task: str | None = option(None, "task (default: the checkpoint's)")
    algorithm: str = option("ppo", "ppo (value head + GAE), grpo (group-normalised returns, no critic) or sac_flow "
                                   "(off-policy SAC of a flow policy from scratch, state observations)")
    noise: str = option("flow_noise", "flow_noise (learned std per token), flow_sde (ODE->SDE) or reinflow "
                                      "(learned std from observation and time)")
    sde_mode: str = option("mixed", "flow_sde: mixed (one stochastic step) or full (all)")
    num_steps: int = option(4, "denoising steps K, for training and evaluation alike")
    exec_steps: int | None = option(None, "actions executed per chunk C, <= H (default: the checkpoint's)")
    noise_level: float = option(0.5, "flow_sde noise level a")
    std_min: float = option(0.08, "flow_noise/reinflow: smallest learned noise std")
    std_max: float = option(0.16, "flow_noise/reinflow: largest learned noise std")
    std_anneal: bool = option(False, "flow_noise/reinflow: hold std_max for 35% of the updates, then cosine-anneal it "
                                     "to 0.3 * std_min + 0.7 * std_max by the last update")
    logprob: str = option("chunk", "ratio granularity: token, action or chunk")
    value_input: str = option("prefix", "critic input: prefix (pooled prefix) or expert (action-expert tokens), "
                                        "both detached; or privileged (the simulator's true state, which the "
                                        "actor never sees; PPO only)")
    reward: str = option("sparse", "sparse (success) or normalized_dense (ManiSkill's shaped reward)")
    ignore_terminations: bool = option(False, "only the time limit ends a training episode, success does not (so a "
                                              "shaped reward keeps paying at the goal); evaluation is unchanged")
    num_envs: int = option(8, "parallel envs per process")
    rollout_chunks: int = option(16, "PPO: chunk steps per env per rollout (GRPO: one whole episode per env)")
    group_size: int = option(4, "GRPO: envs sharing a reset seed")
    grpo_filter: bool = option(True, "GRPO: drop groups where every episode succeeded or every one failed (no signal)")
    total_env_steps: int = option(100_000, "env step budget over all processes")
    risk_beta: float = option(0.0, "entropic risk B: maximise (1/B) log E[exp(B * return)]; > 0 risk-seeking, "
                                   "< 0 risk-averse, 0 the expected return (scale it to 1 / the return range)")
    gamma: float = option(0.99, "discount per chunk step")
    gae_lambda: float = option(0.95, "GAE lambda")
    clip: float = option(0.2, "PPO ratio clip")
    value_clip: float = option(0.2, "value-loss clip")
    huber_delta: float = option(10.0, "Huber delta of the value loss")
    ent_coef: float = option(0.005, "entropy bonus coefficient")
    lr: float = option(1e-4, "actor (action expert, noise head) learning rate")
    value_lr: float = option(1e-3, "value head learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    critic_warmup: int = option(0, "updates that train only the value head (PPO; ignored with a warning for GRPO); "
                                   "sac_flow: critic updates before the first actor update")
    epochs: int = option(4, "passes over each rollout")
    minibatch: int = option(64, "chunk samples per gradient step")
    target_kl: float | None = option(None, "stop an update's remaining epochs once an epoch's mean approx KL "
                                           "exceeds this (default: never)")
    max_grad_norm: float = option(1.0, "gradient norm clip")
    cotrain_data: str | None = option(None, "RL-Co: real(-proxy) episode dataset (or lerobot:DIR); its flow-matching "
                                            "loss anchors the policy")
    cotrain_weight: float = option(0.2, "RL-Co beta in L = L_RL + beta * L_SFT(real)")
    cotrain_batch: int = option(32, "RL-Co: real samples per RL minibatch")
    freeze_vision: bool = option(False, "freeze the vision encoder")
    expert_only: bool = option(False, "train the action expert and heads only (prefix encoder frozen)")
    precision: str = option("fp32", PRECISION_HELP + " (PPO / GRPO)")
    frozen_dtype: str = option("fp32", FROZEN_DTYPE_HELP)
    eval_every: int = option(0, "updates between evaluations (0: only at the end)")
    eval_episodes: int = option(20, "episodes per evaluation")
    eval_envs: int = option(2, "parallel envs for evaluation")
    eval_domain: str | None = option(None, "also evaluate in this shifted domain at every evaluation ('real_proxy' "
                                           "or a domain YAML); rollouts stay in the plain sim")
    save_every: int = option(10, "updates between checkpoints")
    seed: int = option(0, "seed of envs, sampling and updates")
    sim_backend: str = option("physx_cpu", "physx_cpu (one process per env) or physx_cuda (GPU, one process)")
    max_episode_steps: int | None = option(None, "episode horizon (default: the task's)")
    resume: bool = option(False, "continue the run in --out from its last checkpoint")
    fsdp: bool = option(False, "under torchrun: shard the policy (model and heads) over the processes (FSDP, "
                               "fully_shard; gloo on CPU, NCCL on GPUs), each stepping its own envs (PPO/GRPO; "
                               "no --resume)")
    # sac_flow (docs/rl.md, "Off-policy: SAC Flow"); it also reads ckpt (start from an SFT checkpoint; without it,
    # a flow policy from scratch), num_steps, exec_steps (from scratch H = C, default 4), gamma, lr (actor heads and
    # temperature), value_lr (critics), minibatch, max_grad_norm, rollout_chunks (chunk steps per env between logs),
    # num_envs, total_env_steps, eval_*, save_every, seed
    velocity: str = option("flow_g", "sac_flow velocity: flow_g (gated), flow_t (decoded by a transformer), plain, "
                                     "or gaussian (no flow: the Gaussian SAC baseline)")
    sac_hidden: int = option(256, "sac_flow: hidden width of the actor's and critics' MLPs")
    buffer_size: int = option(200_000, "sac_flow: replay capacity in chunk transitions (memory checked up front)")
    tau: float = option(0.005, "sac_flow: Polyak rate of the target critics per critic update")
    utd: float = option(0.25, "sac_flow: critic updates per chunk transition collected (update-to-data ratio)")
    policy_delay: int = option(2, "sac_flow: critic updates per actor and temperature update")
    n_step: int = option(1, "sac_flow: chunk steps summed in each TD target (n-step return)")
    learning_starts: int = option(1000, "sac_flow: chunk transitions of uniformly random chunks before learning")
    target_entropy: float | None = option(None, "sac_flow: entropy target of the temperature (default: -H*D "
                                                           "from scratch; from --ckpt the chain's entropy with its "
                                                           "noise std at the middle of its band)")
    alpha_init: float = option(0.2, "sac_flow: initial entropy temperature")
    sac_std_min: float = option(0.01, "sac_flow: smallest per-step noise std of the flow chain")
    sac_std_max: float = option(1.0, "sac_flow: largest per-step noise std of the flow chain")
    sac_backbone_lr: float = option(1e-5, "sac_flow from --ckpt: learning rate of the checkpoint's own weights (0 "
                                          "freezes them; its new velocity gate or decoder and the noise head learn "
                                          "at lr)")
    sac_bc_coef: float = option(0.0, "sac_flow from --ckpt: weight of the pull of each flow step's mean towards the "
                                     "starting policy's (0: off)")

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
        one_of("velocity", self.velocity, ACTORS)
        if self.fsdp:
            self._check_fsdp()
        if self.reward == "normalized_dense" and not self.ignore_terminations:
            print("warning: normalized_dense reward with episodes that end at success: reaching the goal stops the "
                  "reward stream, so the policy can learn to hover short of it; set ignore_terminations",
                  file=sys.stderr)
        check_precision(self.precision, self.frozen_dtype, self.frozen_groups(), self.fsdp)
        if self.algorithm == "sac_flow":
            self._check_sac_flow()
        elif not self.ckpt:
            raise UserError("give the SFT checkpoint to start from with --ckpt")
        elif is_hub_path(self.ckpt):
            parse_hub_path(self.ckpt)  # the form, before any work; the trainer downloads it
        else:
            _check_dir("checkpoint", self.ckpt)
        if not self.out:
            raise UserError("give a run directory with --out")
        if self.cotrain_data is not None:
            _check_dir("co-training dataset", str(source_path(self.cotrain_data)))
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
        if self.std_anneal and self.noise == "flow_sde":
            raise UserError("std_anneal shapes the learned noise band of flow_noise/reinflow; flow_sde's noise is "
                            "set by noise_level")
        if self.algorithm == "grpo" and self.reward == "sparse" and self.risk_beta:
            raise UserError(f"risk_beta {self.risk_beta:g} has no effect with GRPO on sparse rewards: every return is "
                            "0 or 1, and the group normalisation undoes any increasing transform of two values; "
                            "use --reward normalized_dense --ignore-terminations or --algorithm ppo")
        if self.algorithm == "grpo" and self.critic_warmup:  # a preset's PPO setting must not waste GRPO rollouts
            print(f"warning: critic_warmup={self.critic_warmup} ignored: GRPO has no critic to warm up",
                  file=sys.stderr)
            self.critic_warmup = 0
        if self.algorithm == "grpo" and self.value_input == "privileged":  # nor should it pay for the critic's state
            print("warning: value_input=privileged ignored: GRPO has no critic", file=sys.stderr)
            self.value_input = "prefix"
        return self

    def _check_fsdp(self) -> None:
        """What a sharded run does not support, refused before any work."""
        if self.algorithm == "sac_flow":
            raise UserError("--fsdp shards PPO/GRPO runs; sac_flow runs in one process")
        if self.resume:
            raise UserError("--fsdp runs write no resumable trainer state (the checkpoint only): drop --resume")
        if int(os.environ.get("WORLD_SIZE", "1")) < 2:
            raise UserError("--fsdp shards the policy over torchrun's processes: start the run with "
                            "torchrun --nproc-per-node N (N >= 2) -m sim_trainer.cli rl ...")

    def frozen_groups(self) -> tuple[str, ...]:
        return groups_to_freeze(self.expert_only, self.freeze_vision)

    def _check_sac_flow(self) -> None:
        if self.precision != "fp32":
            raise UserError("sac_flow trains in fp32 only; drop --precision bf16")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError("sac_flow runs in one process; start it without torchrun")
        if self.ckpt:
            if is_hub_path(self.ckpt):
                parse_hub_path(self.ckpt)
            else:
                _check_dir("checkpoint", self.ckpt)
            if self.velocity not in BACKBONE_VELOCITIES:
                raise UserError(f"sac_flow from a checkpoint wraps its velocity with {', '.join(BACKBONE_VELOCITIES)}"
                                f", not {self.velocity}")
        elif self.sac_bc_coef:
            raise UserError("sac_bc_coef pulls towards a starting policy: give it with --ckpt")
        if self.cotrain_data is not None:
            raise UserError("cotrain_data is for PPO/GRPO; sac_flow has no co-training loss")
        if not self.sac_std_min <= self.sac_std_max:
            raise UserError(f"need sac_std_min <= sac_std_max, got [{self.sac_std_min}, {self.sac_std_max}]")


def _check_dir(what: str, path: str) -> None:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} {path} does not exist")
    if not p.is_dir():
        raise UserError(f"{what} {path} is a file, not a directory")


def set_run_chunking(model, cfg: RLConfig) -> None:
    """The run's C (if given) and K on the starting checkpoint's model, so the saved checkpoint evaluates and
    exports as it was trained."""
    if cfg.exec_steps is not None:
        if cfg.exec_steps > model.cfg.horizon:
            raise UserError(f"exec_steps C={cfg.exec_steps} cannot exceed the chunk horizon H={model.cfg.horizon} "
                            f"of {cfg.ckpt}")
        model.cfg.exec_steps = cfg.exec_steps
    model.cfg.num_steps = cfg.num_steps
