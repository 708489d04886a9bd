"""`sim-trainer rl --algorithm sac_flow`: off-policy SAC Flow over chunk steps, state observations, from scratch or
from an SFT checkpoint (--ckpt: backbone_actor.py wraps the checkpoint's velocity; the run then writes a checkpoint
that `eval`, `export` and serving read).

One iteration: every env runs `rollout_chunks` chunk steps; after each, its transitions enter the replay
buffer (n-step windows, replay.py) and the SAC learner makes `utd` critic updates per transition (sac.py), once
`learning_starts` transitions of uniformly random chunks are in. A chunk step executes all C = H actions of
the chunk; its reward is their sum, and it is done if a step ended the episode (rewards after it are ignored).
Env seeds and sampling noise are a function of (seed, iteration), and the replay buffer is saved with its
sampling generator, so a resumed run needs no other RNG state; episodes in flight when a run stopped start again.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from policy_runtime.hub import local_dir
from policy_runtime.stats import wilson_interval
from sim_trainer.data.normalize import NormStats
from sim_trainer.envs.spec import EnvConfig
from sim_trainer.envs.vec_env import make_vec_env
from sim_trainer.errors import UserError
from sim_trainer.evaluate.rollout import EVAL_SEED_START
from sim_trainer.models.checkpoint import LoadedPolicy, load_checkpoint, save_checkpoint
from sim_trainer.progress import progress_bar
from sim_trainer.rl.backbone_actor import BackboneFlowActor, with_sac_velocity
from sim_trainer.rl.config import RLConfig, set_run_chunking
from sim_trainer.rl.flow_velocity import FlowActor, GaussianActor
from sim_trainer.rl.replay import NStepWindow, ReplayBuffer
from sim_trainer.rl.rollout import TRAIN_SEED_START, execute_chunk
from sim_trainer.rl.sac import SAC, SACSettings
from sim_trainer.run_dir import CHECKPOINT_ENTRIES, RunDir
from sim_trainer.tracking import ScalarLog, WandbSettings
from sim_trainer.trainer_state import applying, check_same_run, load_training, read_meta, save_training

STATE, REPLAY = "sac_state", "replay"
DEFAULT_TASK, DEFAULT_CHUNK = "PushCube-v1", 4
SAC_ENTRIES = CHECKPOINT_ENTRIES | {f"{STATE}.json", f"{STATE}.safetensors", f"{REPLAY}.json",
                                    f"{REPLAY}.safetensors"}
# What makes a resumed run the same run: its task, policy, buffer and how it collects and learns.
RESUME_KEYS = ("ckpt", "task", "algorithm", "velocity", "num_steps", "exec_steps", "num_envs", "reward",
               "max_episode_steps", "sim_backend", "seed", "sac_hidden", "buffer_size", "n_step", "gamma",
               "learning_starts", "sac_std_min", "sac_std_max", "sac_bc_coef", "ignore_terminations")
MEMORY_SHARE = 0.5  # the replay buffer may take at most this share of the machine's memory


def _memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _settings(cfg: RLConfig) -> SACSettings:
    return SACSettings(gamma=cfg.gamma, tau=cfg.tau, actor_lr=cfg.lr, critic_lr=cfg.value_lr, alpha_lr=cfg.lr,
                       alpha_init=cfg.alpha_init, target_entropy=cfg.target_entropy, policy_delay=cfg.policy_delay,
                       max_grad_norm=cfg.max_grad_norm, hidden=cfg.sac_hidden, backbone_lr=cfg.sac_backbone_lr,
                       critic_warmup=cfg.critic_warmup)


def run_chunk(venv, chunk: torch.Tensor, ignore_terminations: bool = False) -> tuple:
    """Execute a chunk [N, C, D] in every env: (reward sum, done, truncated, final state, success during the chunk).

    The state-only, CPU view of `execute_chunk`. With `ignore_terminations` only the time limit ends an episode
    (done and truncated together): success does not stop it, so a shaped reward keeps paying while the goal is held
    and reaching it is never worth less than hovering short of it, as ManiSkill's own SAC trains."""
    out = execute_chunk(venv, chunk, ignore_terminations=ignore_terminations)
    return (out.reward.cpu(), out.ended.cpu(), out.truncated.cpu(), out.final_obs["state"].cpu(),
            out.success.cpu())


class SACFlowTrainer:
    def __init__(self, cfg: RLConfig, force: bool = False, wandb: WandbSettings | None = None):
        self.cfg, self.wandb = cfg.validate(), wandb
        self.run_dir = RunDir(cfg.out, what="an RL run", force=force, resume=cfg.resume, state_file=f"{STATE}.json",
                              replaceable=SAC_ENTRIES, inputs=(cfg.ckpt or None,))
        self.out = self.run_dir.path
        if cfg.resume and (self.out / f"{STATE}.json").exists():
            self._check_resumable()
        self.loaded = self._load_start() if cfg.ckpt else None
        if self.loaded:
            self.env_cfg = EnvConfig.for_policy(self.loaded.spec, cfg.task, reward_mode=cfg.reward,
                                                sim_backend=cfg.sim_backend, max_episode_steps=cfg.max_episode_steps)
            self.chunk = self.loaded.model.cfg.exec_steps
        else:
            self.env_cfg = EnvConfig(task=cfg.task or DEFAULT_TASK, obs_mode="state", reward_mode=cfg.reward,
                                     sim_backend=cfg.sim_backend, max_episode_steps=cfg.max_episode_steps).validate()
            self.chunk = cfg.exec_steps or DEFAULT_CHUNK
        self.iteration, self.env_steps, self.transitions, self.updates, self.owed = 0, 0, 0, 0, 0.0
        self.steps_per_iteration = cfg.num_envs * cfg.rollout_chunks * self.chunk
        self.num_iterations = math.ceil(cfg.total_env_steps / self.steps_per_iteration)

    def _load_start(self) -> LoadedPolicy:
        """The SFT checkpoint, its model at the run's K and C and, for flow_g / flow_t, with a velocity gate at
        z = 1 / a velocity decoder at 0."""
        cfg = self.cfg
        ckpt = local_dir(cfg.ckpt)  # an hf:// checkpoint is downloaded (or found in the cache) here
        loaded = load_checkpoint(ckpt)
        if loaded.spec.obs_mode != "state":
            raise UserError(f"sac_flow from a checkpoint needs a state-observation policy; {cfg.ckpt} observes "
                            f"{loaded.spec.obs_mode}")
        model = loaded.model
        set_run_chunking(model, cfg)
        self.norm = NormStats.load(ckpt / "norm_stats.json")
        return replace(loaded, model=with_sac_velocity(model, self.norm, cfg.velocity))

    def _build(self, obs_dim: int, low: torch.Tensor, high: torch.Tensor) -> None:
        cfg = self.cfg
        if not (torch.isfinite(low).all() and torch.isfinite(high).all()):
            raise UserError(f"sac_flow squashes actions into their bounds, but {self.env_cfg.control_mode} on "
                            f"{self.env_cfg.task} has unbounded actions; choose a bounded control mode")
        need = ReplayBuffer.nbytes(cfg.buffer_size, obs_dim, (self.chunk, len(low)))
        if need > MEMORY_SHARE * _memory_bytes():
            raise UserError(f"buffer_size {cfg.buffer_size} needs {need / 2**30:.1f} GiB, more than half of this "
                            f"machine's {_memory_bytes() / 2**30:.1f} GiB; lower --buffer-size")
        torch.manual_seed(cfg.seed)
        shape = dict(hidden=cfg.sac_hidden, std_min=cfg.sac_std_min, std_max=cfg.sac_std_max)
        if self.loaded:
            self.actor = BackboneFlowActor(self.loaded.model, self.loaded.spec.instruction, low, high,
                                           num_steps=cfg.num_steps, bc_coef=cfg.sac_bc_coef, **shape)
        elif cfg.velocity == "gaussian":
            self.actor = GaussianActor(obs_dim, self.chunk, len(low), low, high, **shape)
        else:
            self.actor = FlowActor(obs_dim, self.chunk, len(low), low, high, velocity=cfg.velocity,
                                   num_steps=cfg.num_steps, **shape)
        self.sac = SAC(self.actor, obs_dim, self.chunk, _settings(cfg))
        self.buffer = ReplayBuffer(cfg.buffer_size, obs_dim, (self.chunk, len(low)), seed=cfg.seed)
        self.window = NStepWindow(cfg.num_envs, cfg.n_step, cfg.gamma)
        self.low, self.high = low, high

    # ----- state on disk ------------------------------------------------------------------------------
    def _counters(self) -> dict:
        return {"iteration": self.iteration, "env_steps": self.env_steps, "transitions": self.transitions,
                "updates": self.updates, "owed": self.owed}

    def save(self) -> None:
        """Trainer state (actor, critics, targets, temperature, optimiser, counters) and the replay buffer. The
        buffer is written first and the state records its save token: after a crash between the two, the older
        state refuses the newer buffer."""
        self.buffer.save(self.out, REPLAY)
        if self.loaded:  # the fine-tuned policy as a checkpoint, for eval, export and serving
            info = {"trained_by": "sim-trainer rl --algorithm sac_flow", "rl_config": asdict(self.cfg),
                    "env_steps": self.env_steps, "start_checkpoint": self.cfg.ckpt}
            save_checkpoint(self.out, self.loaded.model, self.loaded.spec, self.norm, info)
        meta = {**self._counters(), "config": asdict(self.cfg), "trained_by": "sim-trainer rl --algorithm sac_flow",
                "replay_size": self.buffer.size, "replay_token": read_meta(self.out, REPLAY)["token"]}
        save_training(self.out, STATE, meta, self.sac.opt, **self.sac.parts())

    def _check_resumable(self) -> None:
        saved = read_meta(self.out, STATE)
        if not isinstance(saved.get("config"), dict):
            raise UserError(f"cannot resume {self.out}: {STATE}.json does not record the run's configuration")
        check_same_run(self.out, {**asdict(RLConfig()), **saved["config"]}, asdict(self.cfg), RESUME_KEYS)

    def load(self) -> None:
        self._check_resumable()
        meta, parts = load_training(self.out, STATE, self.sac.opt)
        if read_meta(self.out, REPLAY).get("token") != meta.get("replay_token"):
            raise UserError(f"cannot resume from {self.out}: its replay buffer and trainer state come from "
                            "different saves (a save was interrupted)")
        self.buffer.load(self.out, REPLAY)
        with applying(self.out):
            self.sac.load_parts(parts)
            for key in ("iteration", "env_steps", "transitions", "updates"):
                setattr(self, key, int(meta[key]))
            self.owed = float(meta["owed"])
            self.sac.critic_updates = self.updates

    # ----- acting ---------------------------------------------------------------------------------------
    def _chunk_for(self, obs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """From scratch: uniformly random chunks until learning starts, then samples of the flow policy. From a
        checkpoint the policy itself collects from the start."""
        if self.transitions < self.cfg.learning_starts and not self.loaded:
            u = torch.rand((len(obs), self.chunk, len(self.low)), generator=gen)
            return self.low + (self.high - self.low) * u
        with torch.no_grad():
            return self.actor(obs, generator=gen)[0]

    # ----- the loop ---------------------------------------------------------------------------------------
    def run(self) -> Path:
        cfg = self.cfg
        with self.run_dir:
            venv = make_vec_env(self.env_cfg, cfg.num_envs)
            try:
                spec = venv.spec
                self._build(spec.state_dim, torch.tensor(spec.action_low), torch.tensor(spec.action_high))
                if cfg.resume and (self.out / f"{STATE}.json").exists():
                    self.load()
                with ScalarLog(self.out, "rl", asdict(cfg), self.wandb) as scalars:
                    return self._loop(venv, scalars)
            finally:
                venv.close()

    def _loop(self, venv, scalars: ScalarLog) -> Path:
        cfg = self.cfg
        log_path = self.out / "metrics.jsonl"
        bar = progress_bar(total=self.num_iterations * self.steps_per_iteration,
                           initial=self.iteration * self.steps_per_iteration, desc=f"rl sac_flow/{cfg.velocity}",
                           unit="step", unit_scale=True, show=True)
        obs = None
        ep_ret, ep_success = torch.zeros(cfg.num_envs), torch.zeros(cfg.num_envs, dtype=torch.bool)
        while self.iteration < self.num_iterations:
            rng = np.random.default_rng([cfg.seed, self.iteration])
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            if obs is None:
                obs = venv.reset(rng.integers(TRAIN_SEED_START, 2**31 - 1, cfg.num_envs).tolist())["state"].cpu()
            t0, steps0, sums, episodes = time.perf_counter(), self.env_steps, {}, []
            for _ in range(cfg.rollout_chunks):
                chunk = self.sac.executed(self._chunk_for(obs, gen))
                reward, done, truncated, final, success = run_chunk(venv, chunk, cfg.ignore_terminations)
                self.env_steps += cfg.num_envs * self.chunk
                rows = self.window.push(obs, chunk, reward, done, truncated, final)
                if rows is not None:
                    self.buffer.add(rows)
                self.transitions += cfg.num_envs
                ep_ret += reward
                ep_success |= success
                obs = final
                if done.any():
                    episodes += [(bool(ep_success[i]), float(ep_ret[i])) for i in torch.nonzero(done).flatten()]
                    seeds = rng.integers(TRAIN_SEED_START, 2**31 - 1, cfg.num_envs).tolist()
                    obs = venv.reset(seeds, mask=done.numpy())["state"].cpu()
                    ep_ret[done], ep_success[done] = 0.0, False
                for k, v in self._learn(gen).items():
                    sums.setdefault(k, []).append(v)
            self.iteration += 1
            metrics = {k: float(np.mean(v)) for k, v in sums.items()}
            metrics |= {"env_steps_per_s": (self.env_steps - steps0) / (time.perf_counter() - t0),
                        "replay_size": float(self.buffer.size), "updates": float(self.updates),
                        "episodes": float(len(episodes))}
            if episodes:
                metrics |= {"train_success_once": float(np.mean([s for s, _ in episodes])),
                            "train_return": float(np.mean([r for _, r in episodes]))}
            scalars.log({f"rl/{k}": v for k, v in metrics.items()}, self.env_steps)
            with log_path.open("a") as f:
                f.write(json.dumps({"update": self.iteration, "env_steps": self.env_steps, **metrics}) + "\n")
            bar.update(self.steps_per_iteration)
            bar.set_postfix(succ=f"{metrics.get('train_success_once', float('nan')):.2f}",
                            q=f"{metrics.get('q_mean', float('nan')):.2f}")
            last = self.iteration == self.num_iterations
            if last or self.iteration % cfg.save_every == 0:
                self.save()
            if last or (cfg.eval_every and self.iteration % cfg.eval_every == 0):
                self._log_eval(scalars, log_path)
        bar.close()
        return self.out

    def _learn(self, gen: torch.Generator) -> dict[str, float]:
        """The updates this chunk step's transitions pay for (utd per transition), once learning has started."""
        if self.transitions < self.cfg.learning_starts or self.buffer.size < self.cfg.minibatch:
            return {}
        self.owed += self.cfg.utd * self.cfg.num_envs
        sums: dict[str, list[float]] = {}
        while self.owed >= 1:
            for k, v in self.sac.update(self.buffer.sample(self.cfg.minibatch), gen).items():
                sums.setdefault(k, []).append(v)
            self.owed -= 1
            self.updates += 1
        return {k: float(np.mean(v)) for k, v in sums.items()}

    # ----- evaluation -------------------------------------------------------------------------------------
    def evaluate(self, episodes: int) -> dict:
        """success_once on held-out seeds: from scratch, of the deterministic chain (x_0 = 0, no step noise); from a
        checkpoint, of the model as `sim-trainer eval` runs it."""
        cfg = self.cfg
        if self.loaded:
            from sim_trainer.evaluate.rollout import evaluate
            from sim_trainer.policy import ChunkPolicy

            policy = ChunkPolicy(self.loaded.model, self.loaded.spec, num_steps=cfg.num_steps)
            summary = evaluate(policy, self.env_cfg, episodes, cfg.eval_envs, record_video=False,
                               progress=False).summary()
            self.loaded.model.train()
            return summary
        successes: list[bool] = []
        returns: list[float] = []
        venv = make_vec_env(self.env_cfg, min(cfg.eval_envs, episodes))
        try:
            while len(successes) < episodes:
                n = venv.num_envs
                obs = venv.reset([EVAL_SEED_START + len(successes) + i for i in range(n)])["state"].cpu()
                live, succ, ret = torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool), torch.zeros(n)
                while live.any():
                    chunk = self.actor.act_deterministic(obs)
                    reward, done, _, obs, success = run_chunk(venv, chunk)
                    succ |= success & live
                    ret += reward * live
                    live &= ~done
                take = min(n, episodes - len(successes))
                successes += succ[:take].tolist()
                returns += ret[:take].tolist()
        finally:
            venv.close()
        k = sum(successes)
        return {"episodes": len(successes), "success_once": k / len(successes),
                "success_once_wilson95": list(wilson_interval(k, len(successes))),
                "mean_return": float(np.mean(returns))}

    def _log_eval(self, scalars: ScalarLog, log_path: Path) -> None:
        summary = self.evaluate(self.cfg.eval_episodes)
        scalars.log({"eval/success_once": summary["success_once"]}, self.env_steps)
        tqdm.write(f"iteration {self.iteration} ({self.env_steps} env steps): eval success_once "
                   f"{summary['success_once']:.2f} over {summary['episodes']} episodes")
        with log_path.open("a") as f:
            f.write(json.dumps({"update": self.iteration, "env_steps": self.env_steps, "eval": summary}) + "\n")


def train_sac_flow(cfg: RLConfig, force: bool = False, wandb: WandbSettings | None = None) -> Path:
    return SACFlowTrainer(cfg, force=force, wandb=wandb).run()
