"""Flow-matching SFT: AdamW, warmup + cosine LR, EMA weights, gradient clipping, dataset mixing,
TensorBoard, periodic closed-loop evaluation, checkpoints and resume.

The output directory is itself a checkpoint (EMA weights) that `sim-trainer eval` and RL load, plus
trainer_state.{json,safetensors} (raw weights, EMA, AdamW moments, RNG states: no pickle) for resuming.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from sim_trainer.data.episodes import dataset_spec, load_dataset
from sim_trainer.data.normalize import NormStats
from sim_trainer.envs.spec import EnvConfig
from sim_trainer.errors import UserError
from sim_trainer.models.checkpoint import save_checkpoint
from sim_trainer.models.config import ModelConfig
from sim_trainer.models.flow_vla import FlowVLA
from sim_trainer.progress import progress_bar
from sim_trainer.sft.data import ChunkSource, MixedSampler, random_shift


@dataclass
class SFTConfig:
    data: list[str]
    out: str
    mix: list[float] = field(default_factory=list)  # one ratio per dataset; empty = proportional to size
    size: str = "small"
    image_grid: int | None = None  # camera tokens per side; None: the size's default (4 for small)
    horizon: int = 16
    exec_steps: int = 8
    num_steps: int = 10
    steps: int = 20_000
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 1e-4
    warmup: int = 500
    grad_clip: float = 1.0
    ema: float = 0.999
    augment_pad: int = 4
    seed: int = 0
    log_every: int = 50
    save_every: int = 1000
    eval_every: int = 0  # 0 disables periodic closed-loop evaluation
    eval_episodes: int = 10
    eval_envs: int = 1
    resume: bool = False


def lr_at(cfg: SFTConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class EMA:
    """Exponential moving average of every float tensor of the state dict (weights and buffers)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)


def _save_trainer_state(out: Path, step: int, model, ema: EMA, opt, sampler: MixedSampler, gen) -> None:
    tensors = {f"weights/{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors |= {f"ema/{k}": v.contiguous() for k, v in ema.shadow.items()}
    opt_sd = opt.state_dict()
    for i, st in opt_sd["state"].items():
        for name, v in st.items():
            tensors[f"opt/{i}/{name}"] = torch.as_tensor(v).contiguous()
    tensors["rng/torch"] = torch.get_rng_state()
    tensors["rng/gen"] = gen.get_state()
    save_file(tensors, str(out / "trainer_state.safetensors.tmp"))
    os.replace(out / "trainer_state.safetensors.tmp", out / "trainer_state.safetensors")
    meta = {"step": step, "param_groups": opt_sd["param_groups"], "sampler_rng": sampler.rng.bit_generator.state}
    (out / "trainer_state.json.tmp").write_text(json.dumps(meta))
    os.replace(out / "trainer_state.json.tmp", out / "trainer_state.json")


def _load_trainer_state(out: Path, model, ema: EMA, opt, sampler: MixedSampler, gen) -> int:
    try:
        meta = json.loads((out / "trainer_state.json").read_text())
        tensors = load_file(str(out / "trainer_state.safetensors"))
    except (OSError, json.JSONDecodeError, ValueError) as e:
        raise UserError(f"cannot resume from {out}: trainer state unreadable ({e})") from None
    model.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("weights/")})
    ema.shadow = {k[4:]: v for k, v in tensors.items() if k.startswith("ema/")}
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt/"):
            _, i, name = k.split("/", 2)
            state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng/torch"])
    gen.set_state(tensors["rng/gen"])
    sampler.rng.bit_generator.state = meta["sampler_rng"]
    return int(meta["step"])


def train_sft(cfg: SFTConfig) -> Path:
    if not cfg.data:
        raise UserError("give at least one dataset with --data")
    if cfg.mix and len(cfg.mix) != len(cfg.data):
        raise UserError(f"--mix needs one ratio per dataset ({len(cfg.data)}), got {len(cfg.mix)}")
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise UserError("steps and batch size must be positive")
    specs = [dataset_spec(d) for d in cfg.data]
    spec = specs[0]
    for d, s in zip(cfg.data[1:], specs[1:], strict=True):
        diffs = spec.differences(s)
        if diffs:
            raise UserError(f"dataset {d} does not match {cfg.data[0]}: " + "; ".join(diffs))
    sizes = {(c.height, c.width) for c in spec.cameras}
    if len(sizes) > 1 or any(h != w for h, w in sizes):
        raise UserError(f"all cameras must share one square resolution, got {sorted(sizes)}")
    datasets = [load_dataset(d) for d in cfg.data]
    ratios = cfg.mix or [float(sum(len(e) for e in eps)) for eps in datasets]
    model_cfg = ModelConfig.from_size(
        cfg.size, camera_names=tuple(c.name for c in spec.cameras),
        image_size=spec.cameras[0].height if spec.cameras else 0, state_dim=spec.state_dim,
        action_dim=spec.action_dim, horizon=cfg.horizon, exec_steps=cfg.exec_steps, num_steps=cfg.num_steps,
        **({"image_grid": cfg.image_grid} if cfg.image_grid else {}))
    norm = NormStats.from_episodes([e for eps in datasets for e in eps])

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = FlowVLA(model_cfg, norm)
    sampler = MixedSampler([ChunkSource(eps, cfg.horizon, model_cfg.max_text_len) for eps in datasets], ratios,
                           seed=cfg.seed)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "pos" in name or "embed" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    ema = EMA(model, cfg.ema)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    start = 0
    if cfg.resume and (out / "trainer_state.json").exists():
        start = _load_trainer_state(out, model, ema, opt, sampler, gen)
    elif (out / "trainer_state.json").exists():
        raise UserError(f"{out} holds a training run already; pass --resume to continue it or pick a new --out")
    info = {"trained_by": "sim-trainer sft", "sft_config": asdict(cfg),
            "datasets": {d: len(eps) for d, eps in zip(cfg.data, datasets, strict=True)}}

    from torch.utils.tensorboard import SummaryWriter

    tb = SummaryWriter(str(out / "tb"))
    bar = progress_bar(range(start, cfg.steps), initial=start, total=cfg.steps, desc="sft", unit="step")
    t_log, n_log = time.perf_counter(), 0
    model.train()
    for step in bar:
        batch = sampler.sample(cfg.batch_size)
        images = {k: random_shift(v, cfg.augment_pad, gen) for k, v in batch.images.items()}
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        loss = model.flow_matching_loss(images, batch.state, batch.text, batch.actions, valid=batch.valid,
                                        generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(model, step)
        n_log += cfg.batch_size
        if (step + 1) % cfg.log_every == 0:
            rate = n_log / (time.perf_counter() - t_log)
            tb.add_scalar("sft/loss", loss.item(), step + 1)
            tb.add_scalar("sft/grad_norm", grad_norm.item(), step + 1)
            tb.add_scalar("sft/lr", lr_at(cfg, step), step + 1)
            tb.add_scalar("sft/samples_per_s", rate, step + 1)
            bar.set_postfix(loss=f"{loss.item():.4f}", samples_s=f"{rate:.0f}")
            t_log, n_log = time.perf_counter(), 0
        last = step + 1 == cfg.steps
        if last or (step + 1) % cfg.save_every == 0:
            save_checkpoint(out, model, spec, norm, {**info, "step": step + 1}, state_dict=ema.shadow)
            _save_trainer_state(out, step + 1, model, ema, opt, sampler, gen)
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or last):
            _periodic_eval(cfg, model_cfg, norm, spec, ema, tb, step + 1)
    tb.close()
    return out


def _periodic_eval(cfg: SFTConfig, model_cfg, norm, spec, ema: EMA, tb, step: int) -> None:
    from sim_trainer.evaluate.rollout import evaluate
    from sim_trainer.policy import ChunkPolicy

    ema_model = FlowVLA(model_cfg, norm)
    ema_model.load_state_dict(ema.shadow)
    env_cfg = EnvConfig(task=spec.task, obs_mode=spec.obs_mode, control_mode=spec.control_mode,
                        image_size=model_cfg.image_size or 64)
    res = evaluate(ChunkPolicy(ema_model, spec), env_cfg, cfg.eval_episodes, cfg.eval_envs,
                   record_video=False, progress=False)
    s = res.summary()
    tb.add_scalar("eval/success_once", s["success_once"], step)
    tb.add_scalar("eval/success_at_end", s["success_at_end"], step)
    tqdm.write(f"step {step}: eval success {s['success_once']:.2f} over {s['episodes']} episodes")
