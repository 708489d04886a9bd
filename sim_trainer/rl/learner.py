"""The update step: advantages (GAE or GRPO) and minibatch epochs of the clipped surrogate.

Before the first epoch the behaviour log-probs are recomputed by the learner itself, in the first
epoch's minibatch layout: rollout and learner then share numerics exactly, so the ratio of the first
minibatch is exactly 1 (returned as `first_ratio_max_dev` every update); the distance to the log-probs
recorded during the rollout is returned as `logp_rollout_drift`.

RL-Co: with a co-training sampler, every RL minibatch also draws a batch of real(-proxy) demonstrations and
adds beta * (their flow-matching loss), which anchors the policy to the real domain; `cotrain_ratio` logs
|beta * L_SFT| / |L_RL|. Its noise comes from its own generator, so beta = 0 reproduces plain RL exactly.

A privileged critic normalises the simulator state by its running mean and variance (over all ranks); the
rollout's states are merged in after the update, so within an update the rollout's values and the learner's
recomputed ones see the same scaling.
"""

from __future__ import annotations

import math
import time

import torch

from sim_trainer.rl.advantages import gae, grpo_advantages, trajectory_weights
from sim_trainer.rl.config import RLConfig
from sim_trainer.rl.distributed import World
from sim_trainer.rl.losses import explained_variance, masked_mean, policy_loss, reduce_log_prob, value_loss
from sim_trainer.rl.policy import RLPolicy
from sim_trainer.rl.rollout import Rollout
from sim_trainer.sft.data import MixedSampler


def flatten(r: Rollout) -> dict:
    """[T, N, ...] -> [T * N, ...] samples."""
    def f(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, *x.shape[2:])

    batch = {"states": f(r.states), "images": {k: f(v) for k, v in r.images.items()}, "chains": f(r.chains),
             "stochastic": f(r.stochastic), "log_probs": f(r.log_probs)}
    if r.privileged is not None:
        batch["privileged"] = f(r.privileged)
    return batch


def select_obs(batch: dict, idx: torch.Tensor) -> dict:
    obs = {"state": batch["states"][idx], "images": {k: v[idx] for k, v in batch["images"].items()}}
    if "privileged" in batch:
        obs["privileged"] = batch["privileged"][idx]
    return obs


class Learner:
    def __init__(self, policy: RLPolicy, cfg: RLConfig, text: torch.Tensor, exec_steps: int,
                 world: World | None = None, cotrain: MixedSampler | None = None):
        self.policy, self.cfg, self.text, self.chunk = policy, cfg, text, exec_steps
        self.world = world or World()
        self.cotrain = cotrain
        self.cotrain_gen = torch.Generator().manual_seed(cfg.seed + 7919 * self.world.rank)
        self.actor_params = [p for n, p in policy.named_parameters()
                             if p.requires_grad and not n.startswith("value_head.")]
        self.value_params = list(policy.value_head.parameters())
        self.opt = torch.optim.AdamW([{"params": self.actor_params, "lr": cfg.lr},
                                      {"params": self.value_params, "lr": cfg.value_lr}],
                                     betas=(0.9, 0.95), eps=1e-8, weight_decay=cfg.weight_decay)

    def advantages(self, r: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(advantages [T, N], returns [T, N], valid [T, N], loss weights [T, N]).

        PPO weighs every valid chunk step alike; GRPO every kept trajectory alike (see trajectory_weights).
        Both follow the entropic objective of --risk-beta (advantages.py).
        """
        cfg = self.cfg
        if cfg.algorithm == "ppo":
            adv, ret = gae(r.rewards, r.values, r.dones, r.last_value, cfg.gamma, cfg.gae_lambda, cfg.risk_beta)
            valid = r.valid
            n = self.world.sum(valid.sum().float().view(1))
            mean = self.world.sum(adv[valid].sum().view(1)) / n
            var = self.world.sum(((adv[valid] - mean) ** 2).sum().view(1)) / n
            return (adv - mean) / (var.sqrt() + 1e-8), ret, valid, valid.float()
        returns = r.rewards.sum(0)  # one episode per env; rewards after its end are zero
        success = torch.zeros(returns.shape[0], dtype=torch.bool, device=returns.device)
        for env, ep in zip(r.episode_env, r.episodes, strict=True):
            success[env] = ep.success_once
        adv, keep = grpo_advantages(returns, success, cfg.group_size, cfg.grpo_filter, risk_beta=cfg.risk_beta)
        adv = adv.expand_as(r.rewards)
        valid = r.valid & keep
        return adv, adv, valid, trajectory_weights(valid)

    def cotrain_loss(self) -> torch.Tensor:
        """Flow-matching loss of the policy on one batch of co-training (real) demonstrations."""
        b = self.cotrain.sample(self.cfg.cotrain_batch)
        dev = self.text.device
        images = {k: v.to(dev) for k, v in b.images.items()}
        with self.policy.autocast():  # the loss itself is fp32 (masked_mse)
            return self.policy.model.flow_matching_loss(images, b.state.to(dev), b.text.to(dev), b.actions.to(dev),
                                                        valid=b.valid.to(dev), generator=self.cotrain_gen)

    def learn(self, r: Rollout, gen: torch.Generator, update: int) -> dict[str, float]:
        cfg, policy = self.cfg, self.policy
        adv, ret, valid, weight = self.advantages(r)
        batch = flatten(r)
        adv, ret, valid, weight = adv.reshape(-1), ret.reshape(-1), valid.reshape(-1), weight.reshape(-1)
        n = adv.shape[0]
        perms = [torch.randperm(n, generator=gen) for _ in range(cfg.epochs)]
        mbs = [p[i:i + cfg.minibatch] for p in perms for i in range(0, n, cfg.minibatch)]
        per_epoch = math.ceil(n / cfg.minibatch)

        def evaluate(idx: torch.Tensor):
            return policy.evaluate_chain(select_obs(batch, idx), self.text, batch["chains"][idx],
                                         batch["stochastic"][idx])

        old_lp = torch.zeros(n, *reduce_log_prob(batch["log_probs"][:1], self.chunk, cfg.logprob).shape[1:],
                             device=adv.device)
        old_v = torch.zeros(n, device=adv.device)
        with torch.no_grad():
            for idx in mbs[:per_epoch]:
                ev = evaluate(idx)
                old_lp[idx] = reduce_log_prob(ev.log_prob, self.chunk, cfg.logprob)
                old_v[idx] = ev.value
        drift = (old_lp - reduce_log_prob(batch["log_probs"], self.chunk, cfg.logprob)).abs().max()

        train_actor = update >= cfg.critic_warmup
        sums: dict[str, float] = {}
        first_dev = float("nan")
        epoch_kl, steps = 0.0, 0
        t0 = time.perf_counter()
        for j, idx in enumerate(mbs):
            ev = evaluate(idx)
            new_lp = reduce_log_prob(ev.log_prob, self.chunk, cfg.logprob)
            pg, ratio, clip_frac, kl = policy_loss(new_lp, old_lp[idx], adv[idx], weight[idx], cfg.clip)
            if j == 0:
                first_dev = float((ratio - 1).abs().max())
            entropy = masked_mean(ev.entropy[:, :self.chunk].mean((1, 2)), weight[idx])
            loss = (pg - cfg.ent_coef * entropy) if train_actor else torch.zeros((), device=adv.device)
            if cfg.algorithm == "ppo":
                vl = value_loss(ev.value, old_v[idx], ret[idx], valid[idx], cfg.value_clip, cfg.huber_delta)
                loss = loss + vl
                sums["value_loss"] = sums.get("value_loss", 0.0) + vl.item()
            if self.cotrain is not None:
                sft = self.cotrain_loss()
                sums["cotrain_loss"] = sums.get("cotrain_loss", 0.0) + sft.item()
                sums["cotrain_ratio"] = sums.get("cotrain_ratio", 0.0) + (
                    abs(cfg.cotrain_weight * sft.item()) / max(abs(loss.item()), 1e-12))
                loss = loss + cfg.cotrain_weight * sft
            self.opt.zero_grad(set_to_none=True)
            if loss.requires_grad:
                loss.backward()
            self.world.average_gradients(self.actor_params + self.value_params)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.actor_params, cfg.max_grad_norm)
            torch.nn.utils.clip_grad_norm_(self.value_params, cfg.max_grad_norm)
            self.opt.step()
            mean_std = masked_mean(ev.std[:, :self.chunk].mean((1, 2)), weight[idx])
            for k, v in (("policy_loss", pg), ("entropy", entropy), ("clip_frac", clip_frac), ("approx_kl", kl),
                         ("grad_norm", grad_norm), ("mean_std", mean_std)):
                sums[k] = sums.get(k, 0.0) + v.item()
            steps += 1
            epoch_kl += kl.item()
            if cfg.target_kl is not None and (j + 1) % per_epoch == 0:
                # Early stop on the epoch's mean KL over all ranks, so every rank stops at the same minibatch.
                mean_kl = self.world.mean(torch.tensor([epoch_kl / per_epoch], device=adv.device)).item()
                epoch_kl = 0.0
                if mean_kl > cfg.target_kl:
                    break
        if policy.value_input == "privileged":  # for the next rollout: constant within an update
            policy.value_head.norm.update(batch["privileged"][valid], self.world.sum)
        metrics = {k: v / steps for k, v in sums.items()}
        metrics |= {"epochs_run": steps / per_epoch, "first_ratio_max_dev": first_dev,
                    "logp_rollout_drift": drift.item(),
                    "update_s": time.perf_counter() - t0, "valid_frac": valid.float().mean().item(),
                    "actor_trained": float(train_actor)}
        if cfg.algorithm == "ppo":
            metrics["explained_variance"] = explained_variance(old_v[valid], ret[valid])
        return metrics
