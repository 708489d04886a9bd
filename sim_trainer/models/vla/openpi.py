"""openpi's PyTorch checkpoints (`examples/convert_jax_model_to_pytorch.py` output, `train_pytorch.py` steps) as
pi0 / pi0.5 policies.

Layout: model.safetensors (LeRobot's key names without the `model.` prefix, mostly bf16, the tied token embedding
often stored only as lm_head), config.json with openpi's few fields (no "type", no cameras, no robot dims) and
assets/<asset_id>/norm_stats.json (RLinf's copies drop the assets/ level). pi0 and pi0.5 are told apart by their
weights (a "pi05" flag in config.json wins); the robot's state / action dims are the statistics' lengths (openpi
slices its statistics to the data's dims); the normalisation is openpi's (pi0 z-score, pi0.5 quantiles, eps 1e-6
in both directions). The result is translated into LeRobot's config vocabulary and built by the LeRobot loader.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from sim_trainer.errors import UserError
from sim_trainer.models.vla.common import StatsNormalizer
from sim_trainer.models.vla.loader import build_paligemma_policy, read_json, read_weights
from sim_trainer.models.vla.pi0 import Pi0
from sim_trainer.models.vla.pi05 import Pi05

OPENPI_FIELDS = ("action_dim", "action_horizon", "paligemma_variant", "action_expert_variant", "precision")
CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")  # openpi's pi0 / pi0.5 image slots, in order
NORM_STATS = "norm_stats.json"
PRECISIONS = ("float32", "bfloat16", "float16")
# what each model's normalisation reads from norm_stats.json
MODES = {"pi0": ("mean_std", ("mean", "std")), "pi05": ("quantiles", ("q01", "q99"))}
_PI05_KEY = re.compile(r"(model\.)?(time_mlp_(in|out)\.|paligemma_with_expert\.gemma_expert\.model\..*norm\.dense\.)")
_PI0_KEY = re.compile(r"(model\.)?(state_proj\.|action_time_mlp_(in|out)\.)")


def is_openpi_config(config: dict) -> bool:
    """openpi writes config.json without LeRobot's "type" and with its own few fields."""
    return "type" not in config and any(k in config for k in OPENPI_FIELDS)


def asset_ids(directory: Path) -> dict[str, Path]:
    """Every asset id with statistics: assets/<id>/norm_stats.json, or <id>/norm_stats.json (RLinf) when there is
    no assets/ folder. An id may hold slashes (openpi's default id is the dataset's repo id)."""
    root = directory / "assets" if (directory / "assets").is_dir() else directory
    found = {p.parent.relative_to(root).as_posix(): p for p in root.rglob(NORM_STATS) if p.is_file()}
    found.pop(".", None)  # a norm_stats.json beside the weights names no asset
    return dict(sorted(found.items()))


def choose_asset(directory: Path, asset_id: str | None) -> tuple[str, Path]:
    """The asset the user named, or the only one there is."""
    found = asset_ids(directory)
    if asset_id is not None:
        if asset_id not in found:
            raise UserError(f"{directory}: no statistics for asset id {asset_id!r} (assets/{asset_id}/{NORM_STATS}); "
                            f"asset ids there: {', '.join(found) or 'none'}")
        return asset_id, found[asset_id]
    if not found:
        raise UserError(f"{directory}: no normalisation statistics: an openpi checkpoint keeps them in "
                        f"assets/<asset_id>/{NORM_STATS} (copy them from the JAX checkpoint's assets)")
    if len(found) > 1:
        raise UserError(f"{directory} holds statistics for several asset ids ({', '.join(found)}): choose one by "
                        f"writing {directory}#ASSET_ID")
    return next(iter(found.items()))


def policy_kind(config: dict, weights: dict[str, torch.Tensor], directory: Path) -> str:
    """"pi0" or "pi05": config.json's "pi05" flag, else what the weights hold (pi0.5: adaRMS expert norms and
    time_mlp_*; pi0: state_proj and action_time_mlp_*)."""
    if "pi05" in config:
        if not isinstance(config["pi05"], bool):
            raise UserError(f"{directory / 'config.json'}: \"pi05\" must be true or false, got {config['pi05']!r}")
        return "pi05" if config["pi05"] else "pi0"
    pi05 = any(_PI05_KEY.match(k) for k in weights)
    pi0 = any(_PI0_KEY.match(k) for k in weights)
    if pi05 == pi0:
        raise UserError(f"{directory / 'model.safetensors'}: cannot tell pi0 from pi0.5 by its weights (it holds "
                        f"{'both' if pi0 else 'neither'}'s time conditioning); set \"pi05\": true or false in "
                        f"config.json")
    return "pi05" if pi05 else "pi0"


def _positive_int(config: dict, key: str, default: int | None, where: Path) -> int | None:
    if key not in config:
        return default
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def settings(config: dict, where: Path) -> dict:
    """config.json's fields, checked: the model's padded dim, chunk length, prompt length (None: openpi's default
    for the model) and pi0.5's state prompt, with openpi's defaults for what it does not write."""
    for key in ("paligemma_variant", "action_expert_variant"):
        if not isinstance(config.get(key, ""), str):
            raise UserError(f"{where}: {key} must be a variant name such as gemma_2b, got {config[key]!r}")
    if config.get("precision", "float32") not in PRECISIONS:
        raise UserError(f"{where}: precision {config['precision']!r} is not one of {', '.join(PRECISIONS)}")
    prompt_dims = config.get("state_prompt_dims", "robot")
    if prompt_dims not in ("robot", "padded"):
        raise UserError(f"{where}: state_prompt_dims must be \"robot\" or \"padded\", got {prompt_dims!r}")
    return {"model_dim": _positive_int(config, "action_dim", 32, where),
            "horizon": _positive_int(config, "action_horizon", 50, where),
            "max_token_len": _positive_int(config, "max_token_len", None, where),
            "state_prompt_dims": prompt_dims}


def read_norm_stats(path: Path, kind: str) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """The state and action statistics the model's normalisation needs, each a list of finite numbers, the
    lists of one feature equally long."""
    stats = read_json(path).get("norm_stats")
    if not isinstance(stats, dict):
        raise UserError(f"{path}: no \"norm_stats\" object (openpi writes {{\"norm_stats\": {{\"state\": ..., "
                        f"\"actions\": ...}}}})")
    _, needs = MODES[kind]
    out = []
    for feature in ("state", "actions"):
        entry = stats.get(feature)
        if not isinstance(entry, dict):
            raise UserError(f"{path}: norm_stats has no {feature!r} statistics")
        values = {}
        for k in needs:
            v = entry.get(k)
            if not (isinstance(v, list) and v and all(isinstance(x, int | float) and not isinstance(x, bool)
                                                      and math.isfinite(x) for x in v)):
                raise UserError(f"{path}: norm_stats.{feature}.{k} must be a list of finite numbers (the "
                                f"{'pi0.5' if kind == 'pi05' else 'pi0'} normalisation needs {' and '.join(needs)})")
            values[k] = [float(x) for x in v]
        if len({len(v) for v in values.values()}) > 1:
            raise UserError(f"{path}: norm_stats.{feature}: {' and '.join(needs)} differ in length")
        out.append(values)
    return out[0], out[1]


def locate(directory: Path, config: dict, asset_id: str | None) -> str:
    """The asset whose statistics to use, with config.json checked: what can be wrong before the weights are
    read is found here."""
    settings(config, directory / "config.json")
    return choose_asset(directory, asset_id)[0]


def lerobot_config(kind: str, s: dict, state_dim: int, action_dim: int) -> dict:
    """The checkpoint in LeRobot's config vocabulary (what the LeRobot builder reads); sizes come from the weights."""
    images = {f"observation.images.{c}": {"type": "VISUAL"} for c in CAMERAS}
    return {"type": kind,
            "input_features": {**images, "observation.state": {"type": "STATE", "shape": [state_dim]}},
            "output_features": {"action": {"type": "ACTION", "shape": [action_dim]}},
            "chunk_size": s["horizon"], "n_action_steps": s["horizon"],
            "tokenizer_max_length": s["max_token_len"] or (200 if kind == "pi05" else 48),  # openpi's defaults
            "max_state_dim": s["model_dim"], "max_action_dim": s["model_dim"]}


def build_openpi(directory: Path, config: dict, asset_id: str | None) -> torch.nn.Module:
    """pi0 / pi0.5 from an openpi PyTorch checkpoint, with the statistics of `asset_id` (or the only asset)."""
    where = directory / "config.json"
    weights = read_weights(directory)
    kind = policy_kind(config, weights, directory)
    s = settings(config, where)
    _, path = choose_asset(directory, asset_id)
    state, actions = read_norm_stats(path, kind)
    state_dim, action_dim = len(next(iter(state.values()))), len(next(iter(actions.values())))
    if max(state_dim, action_dim) > s["model_dim"]:
        raise UserError(f"{path}: statistics for {state_dim} state / {action_dim} action dims, more than the "
                        f"model's action_dim {s['model_dim']} in {where}")
    mode, _ = MODES[kind]
    norms = (StatsNormalizer(mode, state, convention="openpi"), StatsNormalizer(mode, actions, convention="openpi"))
    cls = Pi05 if kind == "pi05" else Pi0
    extra = {"state_prompt_dims": s["state_prompt_dims"]} if kind == "pi05" else None
    return build_paligemma_policy(cls, directory, lerobot_config(kind, s, state_dim, action_dim), extra,
                                  weights=weights, norms=norms)
