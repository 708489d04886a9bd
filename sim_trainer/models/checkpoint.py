"""The checkpoint directory training writes and eval/export read: config.json, model.safetensors, norm_stats.json.

No pickle. A pi0 / pi0.5 backbone (version 2) also records its type in config.json ("backbone"), its settings in
LeRobot's vocabulary ("model") and keeps its tokenizer.json beside the weights (see models/backbones.py); our own
FlowVLA checkpoints are written and read as before (version 1).

Optional trainer state for resuming (trainer_state.json + trainer_state.safetensors) lives beside them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from policy_runtime.artifacts import atomic_write_text
from policy_runtime.contract import PolicySpec
from policy_runtime.export_dir import file_sha256
from sim_trainer.data.normalize import NormStats
from sim_trainer.errors import UserError
from sim_trainer.models.backbones import (
    backbone_type,
    lerobot_config,
    load_backbone,
    merged_lora,
    write_backbone_files,
)
from sim_trainer.models.config import ModelConfig
from sim_trainer.models.flow_vla import FlowVLA
from sim_trainer.models.interface import FlowPolicy
from sim_trainer.models.precision import full_precision

CHECKPOINT_FORMAT = "flow-vla-checkpoint"
CHECKPOINT_VERSION = 2  # 2: a backbone checkpoint; FlowVLA checkpoints are still written as version 1


@dataclass
class LoadedPolicy:
    model: FlowPolicy
    spec: PolicySpec
    info: dict  # free-form provenance: how it was trained, on what


def save_checkpoint(path: str | Path, model: FlowPolicy, spec: PolicySpec, norm: NormStats, info: dict | None = None,
                    state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a checkpoint; `state_dict` overrides the model's own weights (e.g. the EMA weights). The weights are
    written in fp32 (frozen groups a run stored in bf16 are cast back), so a checkpoint never depends on how it
    was trained."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = full_precision({k: v.detach().cpu().contiguous() for k, v in (state_dict or model.state_dict()).items()})
    kind = backbone_type(model)
    if kind is not None:  # LoRA adapters are merged into the weights they adapt: the checkpoint is a plain model
        weights = merged_lora(weights, getattr(model, "lora_scale", 1.0))
        write_backbone_files(path, model)
    tmp = path / "model.safetensors.tmp"
    save_file(weights, str(tmp))
    os.replace(tmp, path / "model.safetensors")
    norm.save(path / "norm_stats.json")
    head = {"format": CHECKPOINT_FORMAT, "version": 1, "model": model.cfg.to_dict()} if kind is None else \
        {"format": CHECKPOINT_FORMAT, "version": 2, "backbone": kind, "model": lerobot_config(model)}
    config = {
        **head,
        "spec": spec.to_dict(),
        "info": info or {},
        "weights_sha256": file_sha256(path / "model.safetensors"),
    }
    atomic_write_text(path / "config.json", json.dumps(config, indent=2))  # written last: it names the weights
    return path


def describe_kind(path: Path) -> str:
    """What is at `path`, for messages: a file where a directory belongs is not "missing".

    os.path, unlike pathlib, answers False instead of raising for a name too long or an unreadable parent."""
    if os.path.isdir(path):
        return "a directory"
    if os.path.isfile(path):
        return "a file"
    if os.path.islink(path):
        return "a broken symbolic link"
    return "not a regular file" if os.path.lexists(path) else "missing"


def _check_layout(path: Path) -> None:
    if not os.path.isdir(path):
        kind = describe_kind(path)
        raise UserError(f"checkpoint {path} does not exist" if kind == "missing"
                        else f"checkpoint {path} is {kind}, not a checkpoint directory")
    if (path / "manifest.json").is_file() and not (path / "config.json").exists():
        raise UserError(f"{path} is an ONNX export (manifest.json), not a checkpoint directory")
    for name in ("config.json", "model.safetensors", "norm_stats.json"):
        if not (path / name).is_file():
            kind = describe_kind(path / name)
            detail = f"{name} is missing" if kind == "missing" else f"{name} is {kind}, not a file"
            raise UserError(f"checkpoint {path} is incomplete: {detail}")


def _read_config(path: Path) -> dict:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {path}: config.json is not readable JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a {CHECKPOINT_FORMAT} directory")
    version = config.get("version", 0)
    if type(version) is not int:
        raise UserError(f"checkpoint {path}: config.json version must be a whole number, got {version!r}")
    if version > CHECKPOINT_VERSION:
        raise UserError(f"checkpoint {path} has version {version}; this software reads up to {CHECKPOINT_VERSION}")
    for key in ("model", "spec"):
        if not isinstance(config.get(key), dict):
            raise UserError(f"checkpoint {path}: config.json {key} must be a mapping, got {config.get(key)!r:.60}")
    return config


def _check_consistent(cfg, spec: PolicySpec, where: str) -> None:
    """The model's sizes and the spec it was trained for must agree, or the first forward pass would crash."""
    if not isinstance(cfg, ModelConfig):  # a backbone: resizes its images, may have more camera slots
        pairs = [("state size", cfg.state_dim, spec.state_dim), ("action size", cfg.action_dim, spec.action_dim),
                 ("cameras", [c.name for c in spec.cameras], list(cfg.camera_names[:len(spec.cameras)]))]
        for what, model, contract in pairs:
            if model != contract:
                raise UserError(f"{where}: config.json disagrees with itself on the {what}: model {model}, "
                                f"spec {contract}")
        return
    pairs = [("state size", cfg.state_dim, spec.state_dim), ("action size", cfg.action_dim, spec.action_dim),
             ("action bounds", cfg.action_dim, len(spec.action_low)),
             ("action bounds", cfg.action_dim, len(spec.action_high)),
             ("cameras", list(cfg.camera_names), [c.name for c in spec.cameras])]
    pairs += [(f"camera {c.name} size", (cfg.image_size, cfg.image_size), (c.height, c.width)) for c in spec.cameras]
    for what, model, contract in pairs:
        if model != contract:
            raise UserError(f"{where}: config.json disagrees with itself on the {what}: model {model}, spec {contract}")
    if not 0 < spec.control_hz < 1e4:
        raise UserError(f"{where}: config.json spec control_hz must be a positive rate, got {spec.control_hz}")


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> LoadedPolicy:
    """Load a checkpoint; every way it can be wrong (layout, types, sizes, weights) is one UserError line."""
    path = Path(path)
    _check_layout(path)
    config = _read_config(path)
    where = f"checkpoint {path}"
    if "backbone" in config:
        return _load_backbone_checkpoint(path, config, map_location)
    try:
        cfg = ModelConfig.from_dict(config["model"])
        spec = PolicySpec.from_dict(config["spec"])
    except UserError as e:
        raise UserError(f"{where}: config.json {e}") from None
    _check_consistent(cfg, spec, where)
    norm = NormStats.load(path / "norm_stats.json")
    norm.check_dims(cfg.state_dim, cfg.action_dim, f"{where}: norm_stats.json")
    model = FlowVLA(cfg, norm)
    weights = _read_weights(path, map_location)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:200]
        raise UserError(f"{where}: weights do not match its config.json ({first})") from None
    return LoadedPolicy(model.eval(), spec, config.get("info", {}))


def _read_weights(path: Path, map_location: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path / "model.safetensors"), device=map_location)
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"checkpoint {path}: model.safetensors is corrupt ({e})") from None


def _load_backbone_checkpoint(path: Path, config: dict, map_location: str) -> LoadedPolicy:
    """A pi0 / pi0.5 checkpoint: built from its recorded settings and the weights' shapes, every key checked."""
    where = f"checkpoint {path}"
    try:
        spec = PolicySpec.from_dict(config["spec"])
    except UserError as e:
        raise UserError(f"{where}: config.json {e}") from None
    norm = NormStats.load(path / "norm_stats.json")
    model = load_backbone(path, str(config["backbone"]), config["model"], norm, _read_weights(path, map_location))
    norm.check_dims(model.cfg.state_dim, model.cfg.action_dim, f"{where}: norm_stats.json")
    _check_consistent(model.cfg, spec, where)
    return LoadedPolicy(model.eval(), spec, config.get("info", {}))


def check_compatible(policy: PolicySpec, env: PolicySpec, where: str) -> None:
    """Refuse to run a policy on an environment whose observation/action contract differs."""
    diffs = policy.differences(env)
    if diffs:
        raise UserError(f"checkpoint {where} does not match task {env.task}: " + "; ".join(diffs))
