"""Checkpoint directory (contract 1): config.json, model.safetensors, norm_stats.json. No pickle.

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

from policy_runtime.export_dir import file_sha256
from sim_trainer.data.normalize import NormStats
from sim_trainer.envs.spec import PolicySpec
from sim_trainer.errors import UserError
from sim_trainer.models.config import ModelConfig
from sim_trainer.models.flow_vla import FlowVLA

CHECKPOINT_FORMAT = "flow-vla-checkpoint"
CHECKPOINT_VERSION = 1


@dataclass
class LoadedPolicy:
    model: FlowVLA
    spec: PolicySpec
    info: dict  # free-form provenance: how it was trained, on what


def save_checkpoint(path: str | Path, model: FlowVLA, spec: PolicySpec, norm: NormStats, info: dict | None = None,
                    state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a checkpoint; `state_dict` overrides the model's own weights (e.g. the EMA weights)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in (state_dict or model.state_dict()).items()}
    tmp = path / "model.safetensors.tmp"
    save_file(weights, str(tmp))
    os.replace(tmp, path / "model.safetensors")
    norm.save(path / "norm_stats.json")
    config = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model": model.cfg.to_dict(),
        "spec": spec.to_dict(),
        "info": info or {},
        "weights_sha256": file_sha256(path / "model.safetensors"),
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> LoadedPolicy:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint {path} does not exist or is not a directory")
    for name in ("config.json", "model.safetensors", "norm_stats.json"):
        if not (path / name).is_file():
            raise UserError(f"checkpoint {path} is incomplete: {name} is missing")
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"checkpoint {path}: config.json is not valid JSON ({e})") from None
    if config.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a {CHECKPOINT_FORMAT} directory")
    if int(config.get("version", 0)) > CHECKPOINT_VERSION:
        raise UserError(f"checkpoint {path} has version {config['version']}; this software reads up to "
                        f"{CHECKPOINT_VERSION}")
    cfg = ModelConfig.from_dict(config["model"])
    spec = PolicySpec.from_dict(config["spec"])
    norm = NormStats.load(path / "norm_stats.json")
    model = FlowVLA(cfg, norm)
    try:
        weights = load_file(str(path / "model.safetensors"), device=map_location)
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"checkpoint {path}: model.safetensors is corrupt ({e})") from None
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:200]
        raise UserError(f"checkpoint {path}: weights do not match its config.json ({first})") from None
    return LoadedPolicy(model.eval(), spec, config.get("info", {}))


def check_compatible(policy: PolicySpec, env: PolicySpec, where: str) -> None:
    """Refuse to run a policy on an environment whose observation/action contract differs."""
    diffs = policy.differences(env)
    if diffs:
        raise UserError(f"checkpoint {where} does not match task {env.task}: " + "; ".join(diffs))
