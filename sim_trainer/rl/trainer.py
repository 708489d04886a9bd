"""`sim-trainer rl`: PPO or GRPO fine-tuning of an SFT flow VLA in ManiSkill, over chunk steps.

One update = collect a rollout (rollout.py), compute advantages (GAE with a value head, or GRPO's
group-normalised returns), then `epochs` passes of minibatch steps on the clipped surrogate (learner.py).
Env seeds and sampling noise are a function of (seed, rank, update), so a resumed run needs no RNG state;
episodes in flight when a run was killed start again.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from policy_runtime.hub import local_dir
from sim_trainer.data.normalize import NormStats
from sim_trainer.data.sources import dataset_spec, load_dataset, source_path
from sim_trainer.envs.make import probe_spec
from sim_trainer.envs.spec import EnvConfig
from sim_trainer.envs.vec_env import make_vec_env
from sim_trainer.errors import UserError
from sim_trainer.models.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from sim_trainer.models.interface import freeze_groups
from sim_trainer.models.precision import store_frozen
from sim_trainer.progress import progress_bar
from sim_trainer.rl.config import RLConfig, set_run_chunking
from sim_trainer.rl.distributed import World, full_tensors, print_weights_digest, shard_model
from sim_trainer.rl.heads import annealed_std_max
from sim_trainer.rl.learner import Learner
from sim_trainer.rl.policy import FSDP_METHODS, RLPolicy, SamplerSettings
from sim_trainer.rl.rollout import Collector
from sim_trainer.run_dir import RunDir
from sim_trainer.sft.data import ChunkSource, MixedSampler
from sim_trainer.tracking import ScalarLog, WandbSettings
from sim_trainer.trainer_state import applying, check_same_run, load_training, read_meta, save_training

STATE = "rl_state"
# What makes a resumed run the same run: where it started, what it learns on, how it samples and explores.
RESUME_KEYS = ("ckpt", "task", "algorithm", "noise", "sde_mode", "num_steps", "exec_steps", "num_envs",
               "rollout_chunks", "group_size", "logprob", "value_input", "reward", "max_episode_steps",
               "cotrain_data", "freeze_vision", "expert_only", "seed", "risk_beta", "ignore_terminations")
# |risk_beta| times the return range above this: exp(B * return) spans more than e^20 (see _check_risk_scale).
RISK_SPAN_WARN = 20.0


def _set_trainable(policy: RLPolicy, cfg: RLConfig) -> None:
    """--expert-only freezes the backbone's vision and language groups, --freeze-vision its vision group; the RL
    heads always train."""
    freeze_groups(policy.model.parameter_groups(), cfg.frozen_groups())


def _check_risk_scale(cfg: RLConfig, horizon: int) -> None:
    """Warn where B is out of scale with the returns: the objective then follows the single best (worst) episode,
    and PPO's exponential TD errors exp(B * delta) may overflow float32 (above e^88)."""
    span = 1.0 if cfg.reward == "sparse" else float(horizon)  # returns lie in [0, 1] or [0, horizon]
    if abs(cfg.risk_beta) * span > RISK_SPAN_WARN:
        print(f"warning: risk_beta {cfg.risk_beta:g} on {cfg.reward} returns in [0, {span:g}] weighs outcomes "
              f"up to e^{abs(cfg.risk_beta) * span:.0f} apart; |risk_beta| about 2 / {span:g} tilts as much as "
              "+-2 does on sparse returns", file=sys.stderr)


def _seed_for(cfg: RLConfig, rank: int, update: int) -> tuple[np.random.Generator, torch.Generator]:
    """Env seeds and sampling noise as a pure function of (seed, rank, update): resuming needs no RNG state."""
    rng = np.random.default_rng([cfg.seed, rank, update])
    return rng, torch.Generator().manual_seed(int(rng.integers(2**62)))


class RLTrainer:
    def __init__(self, cfg: RLConfig, world: World | None = None, force: bool = False,
                 wandb: WandbSettings | None = None):
        self.cfg, self.world, self.wandb = cfg.validate(), world or World(), wandb
        ckpt = str(local_dir(cfg.ckpt))  # an hf:// checkpoint is downloaded (or found in the cache) here
        # every rank checks --out (nothing is written before the first barrier, so all see the same); rank 0 locks
        self.run_dir = RunDir(cfg.out, what="an RL run", force=force, resume=cfg.resume,
                              inputs=(ckpt, cfg.cotrain_data and source_path(cfg.cotrain_data)),
                              state_file=f"{STATE}.json")
        self.out = self.run_dir.path
        if cfg.resume and (self.out / f"{STATE}.json").exists():
            self._check_resumable()
        loaded = load_checkpoint(ckpt)
        self.spec, model = loaded.spec, loaded.model
        set_run_chunking(model, cfg)
        self.norm = NormStats.load(Path(ckpt) / "norm_stats.json")
        self.env_cfg = EnvConfig.for_policy(self.spec, cfg.task, reward_mode=cfg.reward, sim_backend=cfg.sim_backend,
                                            max_episode_steps=cfg.max_episode_steps)
        _check_risk_scale(cfg, self.env_cfg.horizon)
        self.eval_domain_cfg = (replace(self.env_cfg, domain=cfg.eval_domain).validate()
                                if cfg.eval_domain else None)
        self.chunk = model.cfg.exec_steps
        torch.manual_seed(cfg.seed)
        sampler = SamplerSettings(cfg.noise, cfg.num_steps, cfg.sde_mode, cfg.noise_level, cfg.std_min, cfg.std_max)
        self.privileged = cfg.value_input == "privileged"
        # the critic's state is what a state-observation env of this task observes (one CPU env, for a moment)
        privileged_dim = probe_spec(replace(self.env_cfg, obs_mode="state")).state_dim if self.privileged else 0
        self.policy = RLPolicy(model, sampler, cfg.value_input, torch.tensor(self.spec.action_low),
                               torch.tensor(self.spec.action_high), privileged_dim, precision=cfg.precision)
        # the policy lives where the simulator's tensors do: this rank's GPU with physx_cuda
        self.device = torch.device("cpu")
        if cfg.sim_backend == "physx_cuda":
            self.device = self.world.comm_device if self.world.comm_device.type == "cuda" else torch.device("cuda")
        if cfg.fsdp and self.device.type != self.world.comm_device.type:
            raise UserError(f"--fsdp shards over {self.world.comm_device.type.upper()} collectives but the policy "
                            f"runs on the {self.device.type.upper()} with {cfg.sim_backend}: on GPUs use "
                            "--sim-backend physx_cuda")
        self.policy.to(self.device)
        _set_trainable(self.policy, cfg)
        self.world.broadcast_parameters(self.policy)
        store_frozen(model.parameter_groups(), cfg.frozen_groups(), cfg.frozen_dtype)  # after the fp32 broadcast
        if cfg.fsdp:  # before the optimizer: it holds the sharded parameters
            shard_model(self.policy, FSDP_METHODS)
            if self.world.is_main:
                print(f"fsdp: the policy sharded over {self.world.size} processes", file=sys.stderr)
        self.text = model.tokenize([self.spec.instruction]).to(self.device)
        self.learner = Learner(self.policy, cfg, self.text, self.chunk, self.world, self._cotrain_sampler(model))
        self.opt = self.learner.opt
        self.update, self.env_steps = 0, 0
        horizon = self.env_cfg.horizon
        self.episodic = cfg.algorithm == "grpo"
        self.chunk_steps = math.ceil(horizon / self.chunk) if self.episodic else cfg.rollout_chunks
        self.steps_per_update = cfg.num_envs * self.chunk_steps * self.chunk * self.world.size
        self.num_updates = math.ceil(cfg.total_env_steps / self.steps_per_update)

    def _anneal_noise(self) -> None:
        """std_anneal: this update's upper noise bound, for its rollout and its learning alike (a pure function of
        the update, so the first-minibatch ratio stays 1 and a resumed run continues the schedule)."""
        head = self.policy.noise_head
        if self.cfg.std_anneal and head is not None:
            head.std_max = annealed_std_max(self.cfg.std_min, self.cfg.std_max, self.update / self.num_updates)

    def _cotrain_sampler(self, model) -> MixedSampler | None:
        """RL-Co: the real(-proxy) demonstrations, checked against the policy's observation/action contract."""
        if not self.cfg.cotrain_data:
            return None
        diffs = self.spec.differences(dataset_spec(self.cfg.cotrain_data))
        if diffs:
            raise UserError(f"co-training data {self.cfg.cotrain_data} does not match {self.cfg.ckpt}: "
                            + "; ".join(diffs))
        episodes = load_dataset(self.cfg.cotrain_data)
        source = ChunkSource(episodes, model.cfg.horizon, model.tokenize)
        return MixedSampler([source], [1.0], seed=self.cfg.seed + 1000 * self.world.rank)

    # ----- state on disk ------------------------------------------------------------------------------
    def _info(self) -> dict:
        return {"trained_by": "sim-trainer rl", "rl_config": asdict(self.cfg), "update": self.update,
                "env_steps": self.env_steps, "start_checkpoint": self.cfg.ckpt}

    def save(self) -> None:
        """Checkpoint (plain SFT-compatible model dir) plus the trainer state to resume from; rank 0 only."""
        save_checkpoint(self.out, self.policy.model, self.spec, self.norm, self._info())
        meta = {"update": self.update, "env_steps": self.env_steps, "config": asdict(self.cfg),
                "world_size": self.world.size}
        save_training(self.out, STATE, meta, self.opt, policy=self.policy.state_dict())

    def save_sharded(self) -> None:
        """--fsdp: gather the policy's weights whole on every rank (a collective), print their sha256 (the ranks
        must agree), and rank 0 writes the model's as the same checkpoint a single process writes."""
        weights = full_tensors(self.policy.state_dict())
        print_weights_digest(weights, self.world.rank, f"update {self.update} ")
        if self.world.is_main:
            model = {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}
            save_checkpoint(self.out, self.policy.model, self.spec, self.norm, self._info(), state_dict=model)

    def _check_resumable(self) -> None:
        """Before any work: the run in --out must be this run (same start, task, method, envs and seed)."""
        saved = read_meta(self.out, STATE)
        if not isinstance(saved.get("config"), dict):
            raise UserError(f"cannot resume {self.out}: {STATE}.json does not record the run's configuration")
        # a field added since the run was saved had its default then (e.g. risk_beta 0: risk-neutral)
        saved_cfg = {**asdict(RLConfig()), **saved["config"]}
        check_same_run(self.out, saved_cfg, asdict(self.cfg), RESUME_KEYS, path_keys=("ckpt", "cotrain_data"))
        if "world_size" in saved:  # older states did not record it
            check_same_run(self.out, saved, {"world_size": self.world.size}, ("world_size",))

    def load(self) -> None:
        self._check_resumable()  # again under the lock: the run may have moved on since
        meta, parts = load_training(self.out, STATE, self.opt)
        with applying(self.out):
            self.policy.load_state_dict(parts["policy"])
            self.update, self.env_steps = int(meta["update"]), int(meta["env_steps"])

    # ----- the loop ---------------------------------------------------------------------------------------
    def evaluate(self, episodes: int, env_cfg: EnvConfig | None = None) -> dict:
        """Deterministic evaluation on held-out seeds, in the training env or in `env_cfg` (a shifted domain)."""
        from sim_trainer.evaluate.rollout import evaluate
        from sim_trainer.policy import ChunkPolicy

        policy = ChunkPolicy(self.policy.model, self.spec, num_steps=self.cfg.num_steps, device=str(self.device),
                             precision=self.cfg.precision)
        res = evaluate(policy, env_cfg or self.env_cfg, episodes, self.cfg.eval_envs, record_video=False,
                       progress=False)
        self.policy.model.train()
        return res.summary()

    def run(self) -> Path:
        cfg, world = self.cfg, self.world
        with self.run_dir if world.is_main else nullcontext():  # locked (and emptied with --force) by rank 0
            world.barrier()
            if cfg.resume and (self.out / f"{STATE}.json").exists():
                self.load()
            venv = make_vec_env(self.env_cfg, cfg.num_envs, privileged=self.privileged)
            try:
                check_compatible(self.spec, venv.spec, cfg.ckpt)
                collector = Collector(venv, self.policy, self.text, self.chunk, cfg.gamma, self.episodic,
                                      cfg.group_size, cfg.ignore_terminations)
                with ScalarLog(self.out, "rl", asdict(cfg), self.wandb) if world.is_main else nullcontext() as scalars:
                    return self._loop(collector, scalars)
            finally:
                venv.close()

    def _loop(self, collector: Collector, scalars: ScalarLog | None) -> Path:
        """The updates; `scalars` is rank 0's (None on the others)."""
        cfg, world = self.cfg, self.world
        log_path = self.out / "metrics.jsonl"
        bar = progress_bar(total=self.num_updates * self.steps_per_update, initial=self.update * self.steps_per_update,
                           desc=f"rl {cfg.algorithm}/{cfg.noise}", unit="step", unit_scale=True, show=world.is_main)
        if self.update == 0:
            self._evaluate_on_rank0(scalars, log_path)
        while self.update < self.num_updates:
            rng, gen = _seed_for(cfg, world.rank, self.update)
            self._anneal_noise()
            t0 = time.perf_counter()
            self.policy.eval()
            rollout = collector.collect(self.chunk_steps, rng, gen)
            t_roll = time.perf_counter() - t0
            self.policy.train()
            metrics = self.learner.learn(rollout, gen, self.update)
            t_update = time.perf_counter() - t0  # rollout + learning: the whole update's wall clock
            self.update += 1
            self.env_steps += rollout.env_steps * world.size
            eps = rollout.episodes
            local = torch.tensor([len(eps), sum(e.success_once for e in eps), sum(e.success_at_end for e in eps),
                                  sum(e.ret for e in eps), float(rollout.env_steps) / t_roll])
            tot = world.sum(local)
            means = world.mean(torch.tensor(list(metrics.values()), dtype=torch.float64))  # one collective
            metrics = dict(zip(metrics, means.tolist(), strict=True))
            if not cfg.fsdp:  # sharded ranks hold different slices; save_sharded compares the gathered weights
                metrics["rank_param_spread"] = self._param_spread()
            metrics |= {"env_steps_per_s": float(tot[4]), "rollout_s": t_roll, "update_s": t_update,
                        "episodes": float(tot[0])}
            if tot[0] > 0:
                metrics |= {"train_success_once": float(tot[1] / tot[0]),
                            "train_success_at_end": float(tot[2] / tot[0]), "train_return": float(tot[3] / tot[0])}
            if world.is_main:
                scalars.log({f"rl/{k}": v for k, v in metrics.items() if not math.isnan(v)}, self.env_steps)
                with log_path.open("a") as f:
                    f.write(json.dumps({"update": self.update, "env_steps": self.env_steps, **metrics}) + "\n")
                bar.update(self.steps_per_update)
                bar.set_postfix(succ=f"{metrics.get('train_success_once', float('nan')):.2f}",
                                kl=f"{metrics['approx_kl']:.3f}", sps=f"{metrics['env_steps_per_s']:.0f}")
            last = self.update == self.num_updates
            if last or self.update % cfg.save_every == 0:
                if cfg.fsdp:
                    self.save_sharded()
                elif world.is_main:
                    self.save()
            if last or (cfg.eval_every and self.update % cfg.eval_every == 0):
                self._evaluate_on_rank0(scalars, log_path)
            world.barrier()
        bar.close()
        return self.out

    def _param_spread(self) -> float:
        """max - min over ranks of a float64 parameter checksum: 0 while data-parallel ranks stay in sync."""
        total = sum(p.detach().double().sum() for p in self.policy.parameters())
        per_rank = torch.zeros(self.world.size, dtype=torch.float64)
        per_rank[self.world.rank] = total
        per_rank = self.world.sum(per_rank)
        return float(per_rank.max() - per_rank.min())

    def _evaluate_on_rank0(self, scalars: ScalarLog | None, log_path: Path) -> None:
        """Rank 0 evaluates; with --fsdp every rank first gathers the whole weights for it (a collective; evaluation
        calls the model's own methods, which FSDP does not hook) and drops them after."""
        if self.cfg.fsdp:
            self.policy.unshard()
        try:
            if self.world.is_main:
                self._log_eval(scalars, log_path, self.cfg.eval_episodes)
        finally:
            if self.cfg.fsdp:
                self.policy.reshard()

    def _log_eval(self, scalars: ScalarLog, log_path: Path, episodes: int) -> None:
        keys = ("episodes", "success_once", "success_once_wilson95", "success_at_end", "mean_return")
        row: dict = {"update": self.update, "env_steps": self.env_steps}
        runs = [("eval", self.env_cfg)] + ([("eval_domain", self.eval_domain_cfg)] if self.eval_domain_cfg else [])
        for name, env_cfg in runs:
            s = self.evaluate(episodes, env_cfg)
            scalars.log({f"{name}/success_once": s["success_once"], f"{name}/success_at_end": s["success_at_end"]},
                        self.env_steps)
            row[name] = {k: s[k] for k in keys} | ({"domain": env_cfg.domain} if env_cfg.domain else {})
            tqdm.write(f"update {self.update} ({self.env_steps} env steps): {name} "
                       f"{env_cfg.domain or 'sim'} success_once {s['success_once']:.2f} over {s['episodes']} "
                       "episodes")
        with log_path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def train_rl(cfg: RLConfig, force: bool = False, wandb: WandbSettings | None = None) -> Path:
    """Any algorithm's run into cfg.out; scalars to TensorBoard, and to W&B with `wandb` (rank 0)."""
    if cfg.algorithm == "sac_flow":  # off-policy, single process: its own trainer
        from sim_trainer.rl.sac_trainer import train_sac_flow

        return train_sac_flow(cfg, force=force, wandb=wandb)
    world = World.init()
    try:
        return RLTrainer(cfg, world, force=force, wandb=wandb).run()
    finally:
        world.close()
