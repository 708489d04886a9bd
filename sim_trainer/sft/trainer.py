"""Flow-matching (or shortcut, see models/flow.py) SFT: AdamW, warmup + cosine LR, EMA weights, gradient clipping,
dataset mixing, TensorBoard (and W&B, sim_trainer/tracking.py), periodic closed-loop evaluation, checkpoints and resume.

The output directory is itself a checkpoint (EMA weights) that `sim-trainer eval` and RL load, plus
trainer_state.{json,safetensors} (raw weights, EMA, AdamW moments, RNG states: no pickle) for resuming.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from sim_trainer.config_check import SEED_MAX, Range, check_fields, cpu_process_limit
from sim_trainer.config_flags import option
from sim_trainer.data.normalize import NormStats
from sim_trainer.data.sources import dataset_spec, episode_count, load_dataset, source_path
from sim_trainer.envs.spec import EnvConfig
from sim_trainer.errors import UserError
from sim_trainer.models.backbones import TINY, fit_to_dataset, tiny_backbone
from sim_trainer.models.checkpoint import save_checkpoint
from sim_trainer.models.config import SIZES, ModelConfig
from sim_trainer.models.flow_vla import FlowVLA
from sim_trainer.models.interface import freeze_groups, groups_to_freeze
from sim_trainer.models.precision import (
    FROZEN_DTYPE_HELP,
    PRECISION_HELP,
    autocast,
    check_precision,
    store_frozen,
)
from sim_trainer.models.vla.loader import PolicySource, build_vla, locate_vla, split_asset_id
from sim_trainer.progress import progress_bar
from sim_trainer.rl.distributed import World, full_tensors, print_weights_digest, shard_model
from sim_trainer.run_dir import RunDir
from sim_trainer.sft.data import ChunkSource, MixedSampler, random_shift
from sim_trainer.tracking import ScalarLog, WandbSettings
from sim_trainer.trainer_state import applying, check_same_run, load_training, read_meta, save_training

# Every number's allowed range: a typo (a negative or NaN rate, a batch of a million) is refused before work.
SFT_LIMITS = {
    "horizon": Range(1, 256), "exec_steps": Range(1, 256), "num_steps": Range(1, 100), "steps": Range(1, 10**8),
    "batch_size": Range(1, 1024), "lr": Range(0, 1, lo_open=True), "weight_decay": Range(0, 10),
    "warmup": Range(0, 10**8), "grad_clip": Range(0, 1e6, lo_open=True), "ema": Range(0, 1, hi_open=True),
    "augment_pad": Range(0, 32), "seed": Range(0, SEED_MAX), "log_every": Range(1, 10**8),
    "save_every": Range(1, 10**8), "eval_every": Range(0, 10**8), "eval_episodes": Range(1, 10_000),
    "eval_envs": Range(1, cpu_process_limit()), "image_grid": Range(1, 16), "mix": Range(0, 1e6, lo_open=True),
    "consistency_fraction": Range(0, 1, hi_open=True), "lora_rank": Range(0, 1024),
}
BACKBONE_HELP = ("start from a flow VLA instead of our own model: pi0-tiny / pi05-tiny / smolvla-tiny (tiny, random: "
                 "tests and CPU smoke runs), or lerobot:DIR / hf://owner/name (a saved LeRobot pi0 / pi0.5 / SmolVLA "
                 "policy), or openpi:DIR[#ASSET_ID] (an openpi PyTorch checkpoint; #ASSET_ID picks its "
                 "assets/ASSET_ID statistics); its normalisation statistics are replaced by the dataset's")
BACKBONE_PREFIXES = ("lerobot:", "openpi:")  # both read either layout: the directory's files tell which
OBJECTIVES = ("flow", "shortcut")
DEVICES = ("auto", "cuda", "cpu")
# What makes a resumed run the same run: the model, the data and how they are sampled.
RESUME_KEYS = ("data", "mix", "size", "backbone", "expert_only", "freeze_vision", "lora_rank",
               "image_grid", "horizon", "exec_steps", "num_steps", "batch_size", "seed",
               "objective", "consistency_fraction")
STATE = "trainer_state"


@dataclass
class SFTConfig:
    """Every SFT option: a preset key and a flag (`batch_size` -> `--batch-size`), help text as written here."""

    data: list[str] = option([], "episode dataset directories, or lerobot:DIR for a LeRobotDataset v3.0 (repeat "
                                  "--data, or give several, to mix datasets)")
    out: str = option("", "output checkpoint directory (new or empty; see --resume and --force)")
    mix: list[float] = option([], "sampling ratio per dataset, e.g. --mix 0.5 0.5 (default: proportional to size)")
    size: str = option("small", f"model size: {', '.join(SIZES)}")
    backbone: str = option("", BACKBONE_HELP)
    expert_only: bool = option(False, "train the action expert and heads only (vision and language frozen)")
    freeze_vision: bool = option(False, "freeze the vision encoder")
    fsdp: bool = option(False, "under torchrun: shard the model over the processes (FSDP, fully_shard; gloo on CPU, "
                               "NCCL on GPUs), each training on its own samples (no --resume, no --eval-every)")
    lora_rank: int = option(0, "LoRA adapters of this rank on a backbone's language model, which is frozen (0: off; "
                               "merged into the weights in the checkpoint)")
    device: str = option("auto", "where the model trains: auto (this process's GPU when CUDA is available, else the "
                                 "CPU), cuda or cpu")
    precision: str = option("fp32", PRECISION_HELP)
    frozen_dtype: str = option("fp32", FROZEN_DTYPE_HELP)
    image_grid: int | None = option(None, "camera tokens per side, finer localisation (default: the size's, 4 "
                                          "for small)")
    horizon: int = option(16, "chunk length H")
    exec_steps: int = option(8, "actions executed per chunk C (<= H)")
    num_steps: int = option(10, "denoising steps K at inference")
    objective: str = option("flow", "flow (rectified-flow matching) or shortcut (the velocity also sees the step "
                                    "size d; self-consistency across step sizes makes K=1 and K=2 sampling work)")
    consistency_fraction: float = option(0.25, "shortcut: fraction of each batch given self-consistency targets "
                                               "(the rest: flow matching at the finest step)")
    steps: int = option(20_000, "optimizer steps")
    batch_size: int = option(64, "chunks per optimizer step")
    lr: float = option(3e-4, "peak AdamW learning rate (linear warmup, then cosine decay)")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    warmup: int = option(500, "learning-rate warmup steps")
    grad_clip: float = option(1.0, "gradient norm clip")
    ema: float = option(0.999, "EMA decay of the weights the checkpoint holds")
    augment_pad: int = option(4, "random-shift image augmentation, in pixels (0: off)")
    seed: int = option(0, "seed of the model init, sampling and augmentation")
    log_every: int = option(50, "steps between TensorBoard logs")
    save_every: int = option(1000, "steps between checkpoints")
    eval_every: int = option(0, "steps between closed-loop evaluations (0: off)")
    eval_episodes: int = option(10, "episodes per closed-loop evaluation")
    eval_envs: int = option(1, "parallel envs per closed-loop evaluation (one process each)")
    resume: bool = option(False, "continue the run in --out where it stopped")

    def validate(self) -> SFTConfig:
        """Types and ranges of every field, whether it came from YAML or from a flag."""
        check_fields(self, SFT_LIMITS)
        if self.size not in SIZES:
            raise UserError(f"unknown model size {self.size!r}; choose one of {', '.join(SIZES)}")
        if self.objective not in OBJECTIVES:
            raise UserError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if not self.data:
            raise UserError("give at least one dataset with --data")
        if not self.out:
            raise UserError("give an output directory with --out")
        if self.mix and len(self.mix) != len(self.data):
            raise UserError(f"--mix needs one ratio per dataset ({len(self.data)}), got {len(self.mix)}")
        if self.exec_steps > self.horizon:
            raise UserError(f"exec_steps C={self.exec_steps} cannot exceed the chunk horizon H={self.horizon}")
        if self.backbone and self.backbone not in TINY and not self.backbone.startswith((*BACKBONE_PREFIXES, "hf://")):
            raise UserError(f"unknown --backbone {self.backbone!r}; choose {', '.join(TINY)}, lerobot:DIR, "
                            f"openpi:DIR or hf://...")
        if self.backbone and self.objective != "flow":
            raise UserError("--backbone trains with the flow objective only (no shortcut)")
        if self.fsdp and (self.resume or self.eval_every):
            raise UserError("--fsdp runs write no resumable trainer state and no periodic evaluation: drop --resume "
                            "/ --eval-every")
        if self.lora_rank and not self.backbone:
            raise UserError("--lora-rank needs a --backbone (our own model has no language model to adapt)")
        if self.lora_rank and TINY.get(self.backbone) == "smolvla":
            raise UserError("--lora-rank: LoRA is available on pi0 / pi0.5, not on SmolVLA")
        if self.device not in DEVICES:
            raise UserError(f"unknown --device {self.device!r}; choose one of {', '.join(DEVICES)}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: this machine has no CUDA GPU that torch can use; use --device cpu")
        check_precision(self.precision, self.frozen_dtype, frozen_groups(self), self.fsdp)
        return self


def train_device(cfg: SFTConfig, world: World) -> torch.device:
    """cpu, or the GPU of this process (torchrun's local rank) when asked for or available."""
    if cfg.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return world.comm_device if world.comm_device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())


def frozen_groups(cfg: SFTConfig) -> tuple[str, ...]:
    return groups_to_freeze(cfg.expert_only, cfg.freeze_vision, lora=cfg.lora_rank > 0)


def lr_at(cfg: SFTConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class EMA:
    """Exponential moving average of every fp32 tensor of the state dict (weights and buffers); the others are copied
    (integer buffers, and frozen groups stored in bf16: never updated, so their average is themselves)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if v.dtype in (torch.float32, torch.float64):
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)


def _save_trainer_state(out: Path, step: int, model, ema: EMA, opt, sampler: MixedSampler, gen,
                        run: dict) -> None:
    meta = {"step": step, "sampler_rng": sampler.rng.bit_generator.state, **run}
    save_training(out, STATE, meta, opt, weights=model.state_dict(), ema=ema.shadow,
                  rng={"torch": torch.get_rng_state(), "gen": gen.get_state()})


def _load_trainer_state(out: Path, model, ema: EMA, opt, sampler: MixedSampler, gen) -> int:
    meta, parts = load_training(out, STATE, opt)
    with applying(out):
        model.load_state_dict(parts["weights"])
        ema.shadow = parts["ema"]
        if ema.shadow.keys() != model.state_dict().keys():
            raise KeyError("EMA weights are incomplete")
        torch.set_rng_state(parts["rng"]["torch"])
        gen.set_state(parts["rng"]["gen"])
        sampler.rng.bit_generator.state = meta["sampler_rng"]
        return int(meta["step"])


def _run_identity(cfg: SFTConfig) -> dict:
    """What a resumed run must share with the saved one: its config and the episode count of each dataset."""
    return {"config": asdict(cfg), "episodes": [episode_count(d) for d in cfg.data]}


def _check_resumable(out: Path, cfg: SFTConfig) -> None:
    """Before any work: the run in `out` must be this run (same model, data and sampling), not another one."""
    saved = read_meta(out, STATE)
    if not isinstance(saved.get("config"), dict):
        raise UserError(f"cannot resume {out}: {STATE}.json does not record the run's configuration")
    # a run saved before the shortcut objective existed trained with the flow objective
    was = {"objective": "flow", "consistency_fraction": SFTConfig.consistency_fraction, "backbone": "",
           "expert_only": False, "freeze_vision": False, "lora_rank": 0, **saved["config"]}
    check_same_run(out, was, asdict(cfg), RESUME_KEYS, path_keys=("data",))
    for d, was, now in zip(cfg.data, saved.get("episodes") or [], _run_identity(cfg)["episodes"], strict=False):
        if was != now:
            raise UserError(f"cannot resume {out}: dataset {d} had {was} episodes when the run started, now {now}; "
                            "choose a new --out")


def train_sft(cfg: SFTConfig, force: bool = False, wandb: WandbSettings | None = None) -> Path:
    """Train into cfg.out (scalars to TensorBoard, and W&B with `wandb`); everything a user can get wrong is checked
    before the first step. With --fsdp under torchrun the processes share the model (rank 0 writes)."""
    cfg.validate()
    world = World.init() if cfg.fsdp else World()
    try:
        return _train_sft(cfg, world, force, wandb)
    finally:
        world.close()


def _train_sft(cfg: SFTConfig, world: World, force: bool, wandb: WandbSettings | None) -> Path:
    specs = [dataset_spec(d) for d in cfg.data]
    spec = specs[0]
    for d, s in zip(cfg.data[1:], specs[1:], strict=True):
        diffs = spec.differences(s)
        if diffs:
            raise UserError(f"dataset {d} does not match {cfg.data[0]}: " + "; ".join(diffs))
    sizes = {(c.height, c.width) for c in spec.cameras}
    if len(sizes) > 1 or any(h != w for h, w in sizes):
        raise UserError(f"all cameras must share one square resolution, got {sorted(sizes)}")
    if cfg.image_grid and spec.cameras and cfg.image_grid > spec.cameras[0].height:
        raise UserError(f"image_grid {cfg.image_grid} exceeds the {spec.cameras[0].height}-pixel camera images")
    backbone_source = _backbone_source(cfg)
    run_dir = RunDir(cfg.out, what="an SFT run", force=force, resume=cfg.resume,
                     inputs=tuple(source_path(d) for d in cfg.data), state_file=f"{STATE}.json")
    out = run_dir.path
    if cfg.resume and (out / f"{STATE}.json").exists():
        _check_resumable(out, cfg)
    datasets = [load_dataset(d) for d in cfg.data]
    ratios = cfg.mix or [float(sum(len(e) for e in eps)) for eps in datasets]
    model_cfg = ModelConfig.from_size(
        cfg.size, camera_names=tuple(c.name for c in spec.cameras),
        image_size=spec.cameras[0].height if spec.cameras else 0, state_dim=spec.state_dim,
        action_dim=spec.action_dim, horizon=cfg.horizon, exec_steps=cfg.exec_steps, num_steps=cfg.num_steps,
        shortcut=cfg.objective == "shortcut", **({"image_grid": cfg.image_grid} if cfg.image_grid else {}))
    norm = NormStats.from_episodes([e for eps in datasets for e in eps])

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = _build_model(cfg, model_cfg, spec, norm, backbone_source).to(train_device(cfg, world))
    sampler = MixedSampler([ChunkSource(eps, cfg.horizon, model.tokenize) for eps in datasets], ratios,
                           seed=cfg.seed + 1000 * world.rank)
    if cfg.fsdp:
        shard_model(model, ("flow_matching_loss",))
        if world.is_main:
            print(f"fsdp: the model sharded over {world.size} processes", file=sys.stderr)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "pos" in name or "embed" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    ema = EMA(model, cfg.ema)
    with run_dir if world.is_main else contextlib.nullcontext():  # rank 0 locks and writes
        world.barrier()
        start = 0
        if cfg.resume and (out / f"{STATE}.json").exists():
            _check_resumable(out, cfg)  # again under the lock: the run may have moved on since
            start = _load_trainer_state(out, model, ema, opt, sampler, gen)
        with ScalarLog(out, "sft", asdict(cfg), wandb) if world.is_main else _NoLog() as scalars:
            _train(cfg, out, start, model, model_cfg, spec, norm, datasets, sampler, opt, ema, gen, scalars, world)
    return out


class _NoLog(contextlib.nullcontext):
    """The scalar log of a rank that does not write."""

    def log(self, scalars: dict, step: int) -> None:
        pass


def _backbone_source(cfg: SFTConfig) -> PolicySource | None:
    """The policy --backbone names (a LeRobot policy or openpi checkpoint directory, hf://..., or a Hub repo id,
    with an optional #ASSET_ID), found before any work: a wrong name, config or asset choice is one line and
    leaves no output directory behind."""
    if not cfg.backbone or cfg.backbone in TINY:
        return None
    from policy_runtime.hub import local_dir
    text = next((cfg.backbone.removeprefix(p) for p in BACKBONE_PREFIXES if cfg.backbone.startswith(p)),
                cfg.backbone)
    path, asset_id = split_asset_id(text)
    return locate_vla(local_dir(path), asset_id)


def _build_model(cfg: SFTConfig, model_cfg: ModelConfig, spec, norm: NormStats, backbone_source: PolicySource | None):
    """Our FlowVLA, or the --backbone fitted to the dataset (cameras, dims, chunking, its normaliser re-fitted),
    with the groups the options freeze frozen."""
    if not cfg.backbone:
        return FlowVLA(model_cfg, norm)
    shape = (tuple(c.name for c in spec.cameras), spec.state_dim, spec.action_dim, cfg.horizon, cfg.exec_steps,
             cfg.num_steps, norm)
    if cfg.backbone in TINY:
        model = tiny_backbone(cfg.backbone, *shape, seed=cfg.seed)
    else:
        model = build_vla(backbone_source)
        if cfg.lora_rank and not hasattr(model, "enable_lora"):
            raise UserError(f"--lora-rank: LoRA is available on pi0 / pi0.5, not on {type(model).__name__}")
        model = fit_to_dataset(model, *shape)
    if cfg.lora_rank:
        model.enable_lora(rank=cfg.lora_rank)
    groups = model.parameter_groups()
    groups.pop("lora", None)
    freeze_groups(groups, frozen_groups(cfg))
    store_frozen(groups, frozen_groups(cfg), cfg.frozen_dtype)
    return model.train()


def _train(cfg: SFTConfig, out: Path, start: int, model, model_cfg, spec, norm, datasets, sampler, opt, ema,
           gen, scalars: ScalarLog, world: World) -> None:
    info = {"trained_by": "sim-trainer sft", "sft_config": asdict(cfg),
            "datasets": {d: len(eps) for d, eps in zip(cfg.data, datasets, strict=True)}}
    run = _run_identity(cfg)
    bar = progress_bar(range(start, cfg.steps), initial=start, total=cfg.steps, desc="sft", unit="step")
    t_log, n_log = time.perf_counter(), 0
    device = next(model.parameters()).device
    model.train()
    for step in bar:
        batch = sampler.sample(cfg.batch_size)
        batch = replace(batch, images={k: random_shift(v, cfg.augment_pad, gen) for k, v in batch.images.items()})
        batch = batch.to(device)
        images = batch.images
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        with autocast(cfg.precision, device):  # the loss itself is fp32 (masked_mse)
            if cfg.objective == "shortcut":
                loss = model.shortcut_loss(images, batch.state, batch.text, batch.actions, valid=batch.valid,
                                           consistency_fraction=cfg.consistency_fraction, generator=gen)
            else:
                loss = model.flow_matching_loss(images, batch.state, batch.text, batch.actions, valid=batch.valid,
                                                generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        opt.step()
        ema.update(model, step)
        n_log += cfg.batch_size
        if (step + 1) % cfg.log_every == 0:
            rate = n_log / (time.perf_counter() - t_log)
            scalars.log({"sft/loss": loss.item(), "sft/grad_norm": grad_norm.item(), "sft/lr": lr_at(cfg, step),
                         "sft/samples_per_s": rate}, step + 1)
            bar.set_postfix(loss=f"{loss.item():.4f}", samples_s=f"{rate:.0f}")
            t_log, n_log = time.perf_counter(), 0
        last = step + 1 == cfg.steps
        if (last or (step + 1) % cfg.save_every == 0) and cfg.fsdp:
            _save_sharded(out, model, spec, norm, {**info, "step": step + 1}, ema, world)
        elif last or (step + 1) % cfg.save_every == 0:
            save_checkpoint(out, model, spec, norm, {**info, "step": step + 1}, state_dict=ema.shadow)
            _save_trainer_state(out, step + 1, model, ema, opt, sampler, gen, run)
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or last):
            _periodic_eval(cfg, model, spec, ema, scalars, step + 1)


def _save_sharded(out: Path, model, spec, norm: NormStats, info: dict, ema: EMA, world: World) -> None:
    """Gather the EMA weights whole on every rank (a collective), check the ranks agree, rank 0 writes."""
    weights = full_tensors(ema.shadow)
    print_weights_digest(weights, world.rank)
    if world.is_main:
        save_checkpoint(out, model, spec, norm, info, state_dict=weights)
    world.barrier()


def _periodic_eval(cfg: SFTConfig, model, spec, ema: EMA, scalars: ScalarLog, step: int) -> None:
    from sim_trainer.evaluate.rollout import evaluate
    from sim_trainer.policy import ChunkPolicy

    ema_model = copy.deepcopy(model)
    ema_model.load_state_dict(ema.shadow)
    device = str(next(model.parameters()).device)
    res = evaluate(ChunkPolicy(ema_model, spec, device=device, precision=cfg.precision), EnvConfig.for_policy(spec),
                   cfg.eval_episodes, cfg.eval_envs, record_video=False, progress=False)
    s = res.summary()
    scalars.log({"eval/success_once": s["success_once"], "eval/success_at_end": s["success_at_end"]}, step)
    tqdm.write(f"step {step}: eval success {s['success_once']:.2f} over {s['episodes']} episodes")
