"""Load a saved LeRobot policy directory (pi0 / pi0.5; other types register a builder) or an openpi PyTorch
checkpoint (models/vla/openpi.py) into our models.

LeRobot layout read: config.json (draccus, with "type"), model.safetensors (LeRobot's key names, with or without
the `model.` prefix), the normaliser statistics in the processor safetensors named by policy_preprocessor.json /
policy_postprocessor.json, and tokenizer.json (the model's own tokenizer: copy the tokenizer files of the repo
named in policy_preprocessor.json into the directory). A config.json without "type" that holds openpi's fields
is an openpi checkpoint. A Hub repo id is fetched with huggingface_hub. Every problem is a one-line UserError;
key problems name every key involved.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from sim_trainer.errors import UserError
from sim_trainer.models.vla.common import GemmaDims, StatsNormalizer, VisionDims, VLAConfig

Builder = Callable[[Path, dict], torch.nn.Module]
_BUILDERS: dict[str, Builder] = {}

# checkpoint sub-tree -> our module (a PaliGemma-based policy); the `model.` prefix is optional in files
PALIGEMMA_PREFIXES = (
    ("paligemma_with_expert.paligemma.model.vision_tower.vision_model.", "vision."),
    ("paligemma_with_expert.paligemma.model.multi_modal_projector.linear.", "projector."),
    ("paligemma_with_expert.paligemma.model.language_model.", "lm."),
    ("paligemma_with_expert.gemma_expert.model.", "expert."),
)
LM_HEAD = "paligemma_with_expert.paligemma.lm_head.weight"  # tied to the token embedding, often stored alone
UNUSED = ("paligemma_with_expert.gemma_expert.lm_head.weight",)  # the expert's output head: never used
# the published size variants (the fallback when a tensor that tells a size is missing)
GEMMA_VARIANTS = {"gemma_2b": GemmaDims(2048, 18, 16_384, vocab_size=257_152), "gemma_300m": GemmaDims(1024, 18, 4096)}
SIGLIP_SO400M = VisionDims(1152, 27, 4304, 16, 14, 224)
NORM_MODES = {"MEAN_STD": "mean_std", "QUANTILES": "quantiles", "IDENTITY": "identity"}


def register_vla(policy_type: str, builder: Builder) -> None:
    """Make `load_vla` build `policy_type` (config.json "type") with builder(directory, config)."""
    _BUILDERS[policy_type] = builder


@dataclass(frozen=True)
class PolicySource:
    """A policy directory found and its config read, before any weights are: what `build_vla` builds."""

    directory: Path
    config: dict
    asset_id: str | None = None  # openpi: the assets/<asset_id>/norm_stats.json chosen


def load_vla(path_or_repo_id: str | Path, asset_id: str | None = None) -> torch.nn.Module:
    """A policy from a LeRobot policy directory, an openpi PyTorch checkpoint (`asset_id`, or a `#ASSET_ID`
    suffix, picks its normalisation statistics) or a Hub repo id, in eval mode."""
    return build_vla(locate_vla(path_or_repo_id, asset_id))


def locate_vla(path_or_repo_id: str | Path, asset_id: str | None = None) -> PolicySource:
    """The directory, its config and (openpi) the asset whose statistics to use; every problem found here (no
    such directory, unreadable config, unknown type, missing or ambiguous statistics) is one line, before the
    weights are read."""
    text, named = split_asset_id(str(path_or_repo_id))
    directory = resolve(text)
    config = read_json(directory / "config.json")
    asset_id = asset_id or named
    from sim_trainer.models.vla import openpi  # it builds on this module's readers
    if openpi.is_openpi_config(config):
        return PolicySource(directory, config, openpi.locate(directory, config, asset_id))
    if asset_id:
        raise UserError(f"{directory}: an asset id ({asset_id!r}) picks the statistics of an openpi checkpoint; "
                        f"this is a LeRobot policy directory")
    if config.get("type") not in _BUILDERS:
        raise UserError(f"{directory / 'config.json'}: policy type {config.get('type')!r} is not supported; "
                        f"supported: {', '.join(sorted(_BUILDERS))} (LeRobot), or an openpi checkpoint")
    return PolicySource(directory, config)


def build_vla(source: PolicySource) -> torch.nn.Module:
    """The policy `source` names, weights loaded and checked, in eval mode."""
    from sim_trainer.models.vla import openpi
    if openpi.is_openpi_config(source.config):
        return openpi.build_openpi(source.directory, source.config, source.asset_id).eval()
    return _BUILDERS[source.config["type"]](source.directory, source.config).eval()


def split_asset_id(text: str) -> tuple[str, str | None]:
    """"DIR#ASSET_ID" -> (DIR, ASSET_ID); a path that exists (even with a '#' in its name) is taken whole."""
    if "#" not in text or Path(text).exists():
        return text, None
    path, _, asset_id = text.rpartition("#")
    if not asset_id.strip("/"):
        raise UserError(f"{text}: nothing after '#': write DIR#ASSET_ID (the assets/<ASSET_ID>/norm_stats.json "
                        f"to use)")
    return path, asset_id.strip("/")


def resolve(path_or_repo_id: str | Path) -> Path:
    """A local directory as is; otherwise a Hub repo id ("owner/name") fetched into the Hub cache."""
    p = Path(path_or_repo_id)
    if p.is_dir():
        return p
    if p.exists():
        raise UserError(f"{p} is a file; give the policy directory")
    text = str(path_or_repo_id)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", text):
        raise UserError(f"{text}: no such directory (nor a Hub repo id like lerobot/pi0_base)")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(text))
    except Exception as e:  # offline, unknown repo, gated: all say why in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot fetch {text} from the Hugging Face Hub (offline? give a local directory): "
                        f"{first}") from None


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing: not a saved policy directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object")
    return data


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(directory / "model.safetensors")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (CPU), or one line naming the file (missing, truncated, corrupt)."""
    if not path.is_file():
        raise UserError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable safetensors file (corrupted?): {e}") from None


def read_stats(directory: Path) -> dict[str, torch.Tensor]:
    """The flat "<feature>.<stat>" tensors of every (un)normaliser step the processor JSON files name."""
    stats: dict[str, torch.Tensor] = {}
    for name in ("policy_preprocessor.json", "policy_postprocessor.json"):
        if not (directory / name).is_file():
            continue
        for step in read_json(directory / name).get("steps", []):
            if isinstance(step, dict) and "normalizer" in str(step.get("registry_name", "")) and step.get(
                    "state_file"):
                path = directory / step["state_file"]
                try:
                    stats.update(load_file(str(path)))
                except (SafetensorError, OSError, ValueError) as e:
                    raise UserError(f"cannot read normaliser statistics {path}: {e}") from None
    return stats


def normalizer(config: dict, stats: dict[str, torch.Tensor], feature: str, kind: str, dim: int, where: Path
               ) -> StatsNormalizer:
    """The normaliser of one feature (observation.state / action) in the mode config.json maps its kind to."""
    raw = str(config.get("normalization_mapping", {}).get(kind, "IDENTITY"))
    mode = NORM_MODES.get(raw.split(".")[-1].upper())
    if mode is None:
        raise UserError(f"{where}: normalisation {raw!r} of {kind} is not supported; use one of "
                        f"{', '.join(NORM_MODES)}")
    need = {"mean_std": ("mean", "std"), "quantiles": ("q01", "q99"), "identity": ()}[mode]
    missing = [f"{feature}.{k}" for k in need if f"{feature}.{k}" not in stats]
    if missing:
        raise UserError(f"{where}: no normaliser statistics {', '.join(missing)} (needed by {raw} "
                        f"normalisation; LeRobot saves them in the policy_*processor*.safetensors files)")
    for k in need:
        if stats[f"{feature}.{k}"].shape != (dim,):
            raise UserError(f"{where}: {feature}.{k} has shape {tuple(stats[f'{feature}.{k}'].shape)}, "
                            f"expected ({dim},)")
    return StatsNormalizer(mode, {k: stats[f"{feature}.{k}"] for k in need})


def read_tokenizer(directory: Path):
    """The tokenizer.json in the policy directory (the real PaliGemma file loads the same way)."""
    from tokenizers import Tokenizer
    path = directory / "tokenizer.json"
    if not path.is_file():
        named = ""
        pre = directory / "policy_preprocessor.json"
        if pre.is_file():
            for step in read_json(pre).get("steps", []):
                name = (step.get("config") or {}).get("tokenizer_name") if isinstance(step, dict) else None
                named = f" (the tokenizer files of {name})" if name else named
        raise UserError(f"{directory} has no tokenizer.json: copy the model's tokenizer files{named} into it")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises its own exception type
        raise UserError(f"cannot read tokenizer {path}: {e}") from None


def features(config: dict, where: Path) -> tuple[tuple[str, ...], int, int]:
    """Camera names (without the observation.images. prefix), state dim and action dim from config.json."""
    inputs, outputs = config.get("input_features") or {}, config.get("output_features") or {}
    cams = tuple(k.removeprefix("observation.images.") for k, v in inputs.items()
                 if isinstance(v, dict) and v.get("type") == "VISUAL")
    try:
        state_dim = int(inputs["observation.state"]["shape"][0])
        action_dim = int(outputs["action"]["shape"][0])
    except (KeyError, IndexError, TypeError, ValueError):
        raise UserError(f"{where}: input_features needs observation.state and output_features needs action, "
                        f"each with a shape") from None
    return cams, state_dim, action_dim


def map_keys(weights: dict[str, torch.Tensor], prefixes=PALIGEMMA_PREFIXES, renames: dict[str, str] | None = None,
             aliases: dict[str, str] | None = None, unused: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Checkpoint keys -> our parameter names: drop the optional `model.` prefix, apply `renames` (old key
    start -> new), then the sub-tree `prefixes`; an `aliases` key fills its target only when the target is absent
    (a tied weight stored once); `unused` keys are skipped. Keys that map to nothing keep their name, so the
    key check reports them as unexpected."""
    out, alias = {}, {}
    for key, value in weights.items():
        k = key.removeprefix("model.")
        k = next((new + k[len(old):] for old, new in (renames or {}).items() if k.startswith(old)), k)
        if k in unused:
            continue
        if k in (aliases or {}):
            alias[aliases[k]] = value
            continue
        k = next((ours + k[len(theirs):] for theirs, ours in prefixes if k.startswith(theirs)), k)
        out[k] = value
    return {**alias, **out}


def key_problems(model: torch.nn.Module, ours: dict[str, torch.Tensor]) -> list[str]:
    """Every missing, unexpected and wrong-shaped key (our names), grouped by kind; empty when the weights fit."""
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(("state_norm.", "action_norm."))}
    missing = sorted(set(expected) - set(ours))
    unexpected = sorted(k for k in ours if k not in expected)
    shapes = sorted(f"{k} {tuple(v.shape)} (model: {tuple(expected[k].shape)})" for k, v in ours.items()
                    if k in expected and v.shape != expected[k].shape)
    return [f"{title}: {', '.join(keys)}" for title, keys in
            (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)) if keys]


def check_and_load(model: torch.nn.Module, ours: dict[str, torch.Tensor], where: Path) -> None:
    """Load the weights, naming every missing, unexpected and wrong-shaped key in one line."""
    problems = key_problems(model, ours)
    if problems:
        raise UserError(f"{where / 'model.safetensors'} does not fit the {type(model).__name__} model "
                        f"(our names): {'; '.join(problems)}")
    state = model.state_dict()
    model.load_state_dict({k: v.to(state[k].dtype) for k, v in ours.items()}, strict=False)


def _size(weights: dict, key: str, axis: int, default: int) -> int:
    return int(weights[key].shape[axis]) if key in weights and weights[key].ndim > axis else default


def _depth(weights: dict, prefix: str, default: int) -> int:
    idx = {int(m.group(1)) for k in weights if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(idx) + 1 if idx else default


def gemma_dims(weights: dict, prefix: str, variant: str, with_vocab: bool) -> GemmaDims:
    """A Gemma stack's sizes from its tensors (heads: 8 and one kv head, as every pi variant), falling back
    to the named variant's table for whatever tensor is missing (the key check then names it)."""
    base = GEMMA_VARIANTS.get(variant, GEMMA_VARIANTS["gemma_300m"])
    l0 = f"{prefix}layers.0."
    head_dim = _size(weights, l0 + "self_attn.k_proj.weight", 0, base.head_dim)
    return GemmaDims(
        width=_size(weights, l0 + "mlp.gate_proj.weight", 1, base.width),
        depth=_depth(weights, f"{prefix}layers.", base.depth),
        mlp_dim=_size(weights, l0 + "mlp.gate_proj.weight", 0, base.mlp_dim),
        num_heads=_size(weights, l0 + "self_attn.q_proj.weight", 0, base.num_heads * head_dim) // head_dim,
        num_kv_heads=1, head_dim=head_dim,
        vocab_size=_size(weights, f"{prefix}embed_tokens.weight", 0, base.vocab_size or 257_152) if with_vocab
        else 0)


def vision_dims(weights: dict) -> VisionDims:
    """SigLIP sizes from its tensors; the head count is not in any shape: So400m's heads are 72 wide, smaller
    (test) towers use 16-wide heads."""
    d = SIGLIP_SO400M
    emb = "vision.embeddings."
    width = _size(weights, emb + "patch_embedding.weight", 0, d.width)
    patch = _size(weights, emb + "patch_embedding.weight", 2, d.patch_size)
    n_pos = _size(weights, emb + "position_embedding.weight", 0, (d.image_size // d.patch_size) ** 2)
    return VisionDims(width=width, depth=_depth(weights, "vision.encoder.layers.", d.depth),
                      mlp_dim=_size(weights, "vision.encoder.layers.0.mlp.fc1.weight", 0, d.mlp_dim),
                      num_heads=width // 72 if width % 72 == 0 else max(1, width // 16), patch_size=patch,
                      image_size=math.isqrt(n_pos) * patch)


def paligemma_weights(weights: dict[str, torch.Tensor], renames: dict[str, str]) -> dict[str, torch.Tensor]:
    """A pi0 / pi0.5 checkpoint's tensors under our parameter names."""
    return map_keys(weights, PALIGEMMA_PREFIXES, renames, aliases={LM_HEAD: "lm.embed_tokens.weight"},
                    unused=UNUSED)


def paligemma_config(ours: dict[str, torch.Tensor], config: dict, where: Path, pad_token_id: int = 0,
                     extra: dict | None = None) -> VLAConfig:
    """Sizes from the tensors, cameras / dims / chunking from config.json."""
    cams, state_dim, action_dim = features(config, where)
    vision = vision_dims(ours)
    res = config.get("image_resolution") or [vision.image_size]
    if int(res[0]) != vision.image_size:
        raise UserError(f"{where}: image_resolution {res} does not match the vision tower's "
                        f"{vision.image_size}x{vision.image_size} position table")
    try:
        cfg = VLAConfig(
            lm=gemma_dims(ours, "lm.", config.get("paligemma_variant", "gemma_2b"), with_vocab=True),
            expert=gemma_dims(ours, "expert.", config.get("action_expert_variant", "gemma_300m"), False),
            vision=vision, camera_names=cams, state_dim=state_dim, action_dim=action_dim,
            horizon=int(config.get("chunk_size", 50)), exec_steps=int(config.get("n_action_steps", 50)),
            num_steps=int(config.get("num_inference_steps", 10)),
            max_text_len=int(config.get("tokenizer_max_length", 48)),
            max_state_dim=int(config.get("max_state_dim", 32)), max_action_dim=int(config.get("max_action_dim", 32)),
            empty_cameras=int(config.get("empty_cameras", 0)), min_period=float(config.get("min_period", 4e-3)),
            max_period=float(config.get("max_period", 4.0)), pad_token_id=pad_token_id,
            gradient_checkpointing=bool(config.get("gradient_checkpointing", False)), extra=extra or {})
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: {e}") from None
    if state_dim > cfg.max_state_dim or action_dim > cfg.max_action_dim:
        raise UserError(f"{where}: state ({state_dim}) / action ({action_dim}) dims exceed max_state_dim "
                        f"({cfg.max_state_dim}) / max_action_dim ({cfg.max_action_dim})")
    return cfg


def build_paligemma_policy(cls, directory: Path, config: dict, extra: dict | None = None,
                           weights: dict[str, torch.Tensor] | None = None,
                           norms: tuple[StatsNormalizer, StatsNormalizer] | None = None):
    """pi0 / pi0.5 (`cls`) from a directory, weights loaded and checked: `config` in LeRobot's vocabulary,
    `weights` as read from model.safetensors (read here when None), `norms` the state and action normalisers
    (LeRobot's processor statistics when None)."""
    ours = paligemma_weights(read_weights(directory) if weights is None else weights, cls.checkpoint_renames)
    tokenizer = read_tokenizer(directory)
    pad = tokenizer.token_to_id("<pad>")
    cfg = paligemma_config(ours, config, directory / "config.json", 0 if pad is None else pad, extra)
    n_ids = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1
    if n_ids > cfg.lm.vocab_size:
        raise UserError(f"{directory / 'tokenizer.json'} has token ids up to {n_ids - 1} but the model's "
                        f"embedding has {cfg.lm.vocab_size} rows: not this model's tokenizer")
    if norms is None:
        stats = read_stats(directory)
        norms = (normalizer(config, stats, "observation.state", "STATE", cfg.state_dim, directory),
                 normalizer(config, stats, "action", "ACTION", cfg.action_dim, directory))
    model = cls(cfg, *norms, tokenizer)
    check_and_load(model, ours, directory)
    return model
