"""pi0 / pi0.5 / SmolVLA as backbones of the pipeline: built tiny and random (tests, CPU), taken from
a LeRobot policy and fitted to our dataset, and saved in / loaded from our checkpoint directory.

In a checkpoint, config.json's "backbone" names the type and "model" holds the backbone's config in LeRobot's
config.json vocabulary (cameras, state/action dims, chunking, normalisation modes, prompt settings); sizes are read
back from the weights' shapes exactly as for a LeRobot directory. model.safetensors holds our parameter names
(normaliser buffers included), norm_stats.json the statistics of the dataset it was fitted to, tokenizer.json the
backbone's own tokenizer (SmolVLA: also tokenizer_config.json naming its pad token, and smolvlm/config.json, the
SmolVLM backbone's config, with sizes read from it as LeRobot does).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from sim_trainer.data.normalize import STD_FLOOR, NormStats, Stats
from sim_trainer.errors import UserError
from sim_trainer.models.vla.common import (
    NORM_EPS,
    GemmaDims,
    PaliGemmaFlowPolicy,
    StatsNormalizer,
    VisionDims,
    VLAConfig,
)
from sim_trainer.models.vla.loader import check_and_load, key_problems, paligemma_config, read_tokenizer
from sim_trainer.models.vla.pi0 import Pi0
from sim_trainer.models.vla.pi05 import Pi05
from sim_trainer.models.vla.smolvla import SmolVLAConfig, SmolVLAPolicy, config_from_lerobot
from sim_trainer.models.vla.smolvla_io import MeanStdNormalizer, SmolVLATokenizer, check_state_dict

CLASSES = {"pi0": Pi0, "pi05": Pi05, "smolvla": SmolVLAPolicy}
SMOLVLM_DIR = "smolvlm"  # the SmolVLM backbone's config.json inside a SmolVLA checkpoint
TINY = {"pi0-tiny": "pi0", "pi05-tiny": "pi05", "smolvla-tiny": "smolvla"}
NORM_KEYS = ("state_norm.", "action_norm.")
# pi0's normalisation is LeRobot's MEAN_STD, pi0.5's QUANTILES (each model's own)
NORM_MODES = {"pi0": "mean_std", "pi05": "quantiles"}
TINY_LM = GemmaDims(64, 2, 128, num_heads=8, num_kv_heads=1, head_dim=16, vocab_size=128)
TINY_EXPERT = GemmaDims(32, 2, 64, num_heads=8, num_kv_heads=1, head_dim=16)
TINY_VISION = VisionDims(32, 2, 64, num_heads=2, patch_size=8, image_size=32)  # 16 tokens per camera
# SmolVLA's tiny backbone: a SmolVLM config (Llama 64 wide, 8 heads of 8, 2 kv heads; SigLIP 32 wide on 32 x 32
# images, 16 patches pixel-shuffled into 4 tokens); both layers kept, the first joint, the second cross-attention
TINY_SMOLVLM = {
    "scale_factor": 2,
    "text_config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 128,
                    "max_position_embeddings": 256, "pad_token_id": 0, "rms_norm_eps": 1e-5},
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "image_size": 32, "patch_size": 8},
}


def backbone_type(model: torch.nn.Module) -> str | None:
    """"pi0" / "pi05" / "smolvla" for a backbone, None for our own FlowVLA."""
    return next((name for name, cls in CLASSES.items() if isinstance(model, cls)), None)  # FSDP subclasses too


def manifest_text(model: torch.nn.Module, instruction: str) -> dict | None:
    """The manifest's text field of a backbone (its tokenizer.json beside the model, its prompt rule, its pad id,
    the default instruction's ids as the model makes them); None for our FlowVLA (the byte rule)."""
    kind = backbone_type(model)
    if kind is None:
        return None
    pad = model.tokenizer.pad_id if kind == "smolvla" else model.cfg.pad_token_id
    return {"input": "text", "tokenizer": "tokenizer.json", "file": "tokenizer.json", "prompt": kind,
            "pad_id": pad, "max_len": model.cfg.max_text_len, "instruction": instruction,
            "tokens": model.tokenize([instruction])[0].tolist()}


def char_tokenizer():
    """A character-level tokenizer with PaliGemma's conventions (<pad> = 0, <bos> first): the tiny configs'."""
    from tokenizers import Tokenizer, decoders, models, processors
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok.add_special_tokens(["<pad>", "<eos>", "<bos>", "<unk>"])
    tok.decoder = decoders.Fuse()  # decoding gives the text back
    return tok


def fitted_stats(stats: Stats) -> dict[str, torch.Tensor]:
    """A dataset's statistics as normaliser buffers, floored like our own model's: a constant dimension gets a
    std of STD_FLOOR and a quantile span of 2 * STD_FLOOR around its value, not a division by zero."""
    std = np.maximum(stats.std, STD_FLOOR)
    mid, half = (stats.q01 + stats.q99) / 2, np.maximum((stats.q99 - stats.q01) / 2, STD_FLOOR)
    return {k: torch.as_tensor(v, dtype=torch.float32) for k, v in
            (("mean", stats.mean), ("std", std), ("q01", mid - half), ("q99", mid + half))}


def normalizers(mode: str, norm: NormStats, convention: str = "lerobot") -> tuple[StatsNormalizer, StatsNormalizer]:
    """State and action normalisers in `mode` (mean_std, quantiles, identity) with the dataset's statistics, the
    eps placed as `convention` (lerobot, openpi) places it."""
    return (StatsNormalizer(mode, fitted_stats(norm.state), convention=convention),
            StatsNormalizer(mode, fitted_stats(norm.actions), convention=convention))


def tiny_backbone(name: str, cameras: tuple[str, ...], state_dim: int, action_dim: int, horizon: int,
                  exec_steps: int, num_steps: int, norm: NormStats, seed: int = 0) -> PaliGemmaFlowPolicy:
    """A randomly initialised tiny pi0 / pi0.5 / SmolVLA (160 to 210 K parameters) for CPU tests and smoke runs."""
    kind = TINY[name]
    if kind == "smolvla":
        return _tiny_smolvla(cameras, state_dim, action_dim, horizon, exec_steps, num_steps, norm, seed)
    cfg = VLAConfig(lm=TINY_LM, expert=TINY_EXPERT, vision=TINY_VISION, camera_names=cameras, state_dim=state_dim,
                    action_dim=action_dim, horizon=horizon, exec_steps=exec_steps, num_steps=num_steps,
                    max_text_len=48 if kind == "pi0" else 200, max_state_dim=max(32, state_dim),
                    max_action_dim=max(32, action_dim), extra={"state_prompt_dims": "robot"} if kind == "pi05" else {})
    torch.manual_seed(seed)
    model = CLASSES[kind](cfg, *normalizers(NORM_MODES[kind], norm), char_tokenizer())
    with torch.no_grad():  # LeRobot zero-initialises adaRMS, which would make a random expert an identity
        for mod in model.modules():
            if type(mod).__name__ == "AdaRMSNorm":
                torch.nn.init.normal_(mod.dense.weight, std=mod.dense.weight.shape[-1] ** -0.5)
    return model


def _tiny_smolvla(cameras: tuple[str, ...], state_dim: int, action_dim: int, horizon: int, exec_steps: int,
                  num_steps: int, norm: NormStats, seed: int) -> SmolVLAPolicy:
    """SmolVLA on TINY_SMOLVLM with the character-level tokenizer and the dataset's MEAN_STD statistics."""
    from transformers import SmolVLMConfig

    vlm = SmolVLMConfig(**TINY_SMOLVLM)
    cfg = SmolVLAConfig(horizon=horizon, action_dim=action_dim, state_dim=state_dim, num_steps=num_steps,
                        exec_steps=exec_steps, camera_names=cameras, image_size=32, max_text_len=48,
                        max_state_dim=max(32, state_dim), max_action_dim=max(32, action_dim), resize=(32, 32),
                        num_vlm_layers=2, num_expert_layers=2, vlm_model_name=SMOLVLM_DIR)
    torch.manual_seed(seed)
    state, actions = (fitted_stats(st) for st in (norm.state, norm.actions))
    return SmolVLAPolicy(cfg, vlm, MeanStdNormalizer(state["mean"], state["std"], 1e-8),
                         MeanStdNormalizer(actions["mean"], actions["std"], 1e-8),
                         SmolVLATokenizer(char_tokenizer(), "<pad>", cfg.max_text_len))


def fit_to_dataset(model: PaliGemmaFlowPolicy, cameras: tuple[str, ...], state_dim: int, action_dim: int,
                   horizon: int, exec_steps: int, num_steps: int, norm: NormStats) -> PaliGemmaFlowPolicy:
    """A loaded policy re-targeted to our dataset: our cameras take its image slots in order (the slots left
    over are masked), state and actions are our dims (zero-padded to its max dims), and its normaliser
    statistics are replaced by the dataset's, in the model's own mode and eps convention."""
    cfg = model.cfg
    kind = backbone_type(model)
    if kind is None:
        raise UserError(f"--backbone: a {type(model).__name__} policy cannot be fine-tuned here (pi0, pi05, smolvla)")
    slots = len(cfg.camera_names) + cfg.empty_cameras
    if len(cameras) > slots:
        raise UserError(f"the dataset has {len(cameras)} cameras but the backbone has {slots} image slots")
    if state_dim > cfg.max_state_dim or action_dim > cfg.max_action_dim:
        raise UserError(f"the dataset's state ({state_dim}) / action ({action_dim}) dims exceed the backbone's "
                        f"max_state_dim ({cfg.max_state_dim}) / max_action_dim ({cfg.max_action_dim})")
    cfg.camera_names = tuple(cameras) + tuple(cfg.camera_names[len(cameras):])
    cfg.state_dim, cfg.action_dim, cfg.horizon, cfg.exec_steps, cfg.num_steps = (
        state_dim, action_dim, horizon, exec_steps, num_steps)
    if kind == "smolvla":  # LeRobot's MEAN_STD with the checkpoint's eps
        fitted = [fitted_stats(st) for st in (norm.state, norm.actions)]
        model.state_norm, model.action_norm = (MeanStdNormalizer(f["mean"], f["std"], model.state_norm.eps)
                                               for f in fitted)
    else:
        model.state_norm, model.action_norm = normalizers(model.state_norm.mode, norm, model.state_norm.convention)
    return model


def lerobot_config(model: PaliGemmaFlowPolicy) -> dict:
    """The model's settings in LeRobot's config.json vocabulary (what loading reads back; sizes come from the
    weights)."""
    cfg, kind = model.cfg, backbone_type(model)
    if kind == "smolvla":
        return smolvla_config(model)
    mode = {"mean_std": "MEAN_STD", "quantiles": "QUANTILES", "identity": "IDENTITY"}[model.state_norm.mode]
    images = {f"observation.images.{c}": {"type": "VISUAL", "shape": [3, cfg.image_size, cfg.image_size]}
              for c in cfg.camera_names}
    config = {
        "type": kind,
        "input_features": {**images, "observation.state": {"type": "STATE", "shape": [cfg.state_dim]}},
        "output_features": {"action": {"type": "ACTION", "shape": [cfg.action_dim]}},
        "chunk_size": cfg.horizon, "n_action_steps": cfg.exec_steps, "num_inference_steps": cfg.num_steps,
        "tokenizer_max_length": cfg.max_text_len, "max_state_dim": cfg.max_state_dim,
        "max_action_dim": cfg.max_action_dim, "image_resolution": [cfg.image_size, cfg.image_size],
        "empty_cameras": cfg.empty_cameras, "min_period": cfg.min_period, "max_period": cfg.max_period,
        "normalization_mapping": {"VISUAL": "IDENTITY", "STATE": mode, "ACTION": mode},
        "gradient_checkpointing": cfg.gradient_checkpointing,
    }
    if kind == "pi05":
        config["state_prompt_dims"] = cfg.extra.get("state_prompt_dims", "padded")
    if model.state_norm.convention != "lerobot":  # a policy from an openpi checkpoint keeps openpi's eps
        config["normalization_convention"] = model.state_norm.convention
    return config


def smolvla_config(model: SmolVLAPolicy) -> dict:
    """A SmolVLA's settings in LeRobot's vocabulary (what smolvla.config_from_lerobot reads back)."""
    cfg = model.cfg
    images = {f"observation.images.{c}": {"type": "VISUAL", "shape": [3, cfg.image_size, cfg.image_size]}
              for c in cfg.camera_names}
    return {
        "type": "smolvla",
        "input_features": {**images, "observation.state": {"type": "STATE", "shape": [cfg.state_dim]}},
        "output_features": {"action": {"type": "ACTION", "shape": [cfg.action_dim]}},
        "chunk_size": cfg.horizon, "n_action_steps": cfg.exec_steps, "num_steps": cfg.num_steps,
        "tokenizer_max_length": cfg.max_text_len, "max_state_dim": cfg.max_state_dim,
        "max_action_dim": cfg.max_action_dim, "resize_imgs_with_padding": list(cfg.resize) if cfg.resize else None,
        "empty_cameras": cfg.empty_cameras, "num_vlm_layers": cfg.num_vlm_layers,
        "num_expert_layers": cfg.num_expert_layers, "self_attn_every_n_layers": cfg.self_attn_every_n_layers,
        "attention_mode": "cross_attn" if cfg.cross_attention else "self_attn",
        "expert_width_multiplier": cfg.expert_width_multiplier, "min_period": cfg.min_period,
        "max_period": cfg.max_period, "vlm_model_name": SMOLVLM_DIR,
        "normalization_mapping": {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"},
    }


def merged_lora(weights: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A state dict with peft's LoRA layers folded back: W = W0 + scale * B A under the layer's own name."""
    out = {}
    for key, value in weights.items():
        if ".lora_" in key:
            continue
        if ".base_layer." in key:
            stem, leaf = key.split(".base_layer.")
            a, b = weights.get(f"{stem}.lora_A.default.weight"), weights.get(f"{stem}.lora_B.default.weight")
            if leaf == "weight" and a is not None and b is not None:
                value = value + scale * (b.float() @ a.float()).to(value.dtype)
            key = f"{stem}.{leaf}"
        out[key] = value
    return out


def write_backbone_files(path: Path, model: PaliGemmaFlowPolicy) -> None:
    """The tokenizer, so the checkpoint directory is complete on its own."""
    from policy_runtime.artifacts import atomic_write_text
    if backbone_type(model) == "smolvla":  # its tokenizer (pad token named beside it) and SmolVLM's config
        (path / SMOLVLM_DIR).mkdir(exist_ok=True)
        atomic_write_text(path / SMOLVLM_DIR / "config.json", model.vlm_config.to_json_string())
        atomic_write_text(path / "tokenizer_config.json", json.dumps({"pad_token": model.tokenizer.pad_token}))
        atomic_write_text(path / "tokenizer.json", model.tokenizer.backend.to_str())
        return
    tok = model.tokenizer
    tok.no_truncation()
    tok.no_padding()
    atomic_write_text(path / "tokenizer.json", tok.to_str())


def load_backbone(path: Path, kind: str, config: dict, norm: NormStats,
                  weights: dict[str, torch.Tensor]) -> PaliGemmaFlowPolicy:
    """A backbone saved by save_checkpoint: sizes from the weights, settings from `config`, every key checked."""
    if kind not in CLASSES:
        raise UserError(f"checkpoint {path}: backbone {kind!r} is not supported; supported: {', '.join(CLASSES)}")
    if kind == "smolvla":
        return _load_smolvla(path, config, weights)
    where = path / "config.json"
    ours = {k: v for k, v in weights.items() if not k.startswith(NORM_KEYS)}
    tokenizer = read_tokenizer(path)
    pad = tokenizer.token_to_id("<pad>")
    extra = {"state_prompt_dims": config.get("state_prompt_dims", "padded")} if kind == "pi05" else {}
    cfg = paligemma_config(ours, config, where, 0 if pad is None else pad, extra)
    mode = str((config.get("normalization_mapping") or {}).get("STATE", NORM_MODES[kind])).lower()
    if mode not in ("mean_std", "quantiles", "identity"):
        raise UserError(f"{where}: normalisation {mode!r} is not supported")
    convention = config.get("normalization_convention", "lerobot")
    if convention not in NORM_EPS:
        raise UserError(f"{where}: normalization_convention {convention!r} is not one of {', '.join(NORM_EPS)}")
    model = CLASSES[kind](cfg, *normalizers(mode, norm, convention), tokenizer)
    problems = key_problems(model, ours)
    norm_state = {k: v for k, v in weights.items() if k.startswith(NORM_KEYS)}
    expected_norm = {k for k in model.state_dict() if k.startswith(NORM_KEYS)}
    if set(norm_state) != expected_norm:
        problems.append(f"normaliser buffers {sorted(norm_state)} (model: {sorted(expected_norm)})")
    if problems:
        raise UserError(f"checkpoint {path}: weights do not fit its config.json: {'; '.join(problems)}")
    check_and_load(model, ours, path)
    model.load_state_dict(norm_state, strict=False)
    return model


def _load_smolvla(path: Path, config: dict, weights: dict[str, torch.Tensor]) -> SmolVLAPolicy:
    from transformers import SmolVLMConfig

    from sim_trainer.models.vla.loader import read_json
    where = str(path / "config.json")
    try:
        vlm_config = SmolVLMConfig(**read_json(path / SMOLVLM_DIR / "config.json"))
    except (TypeError, ValueError, KeyError) as e:
        raise UserError(f"{path / SMOLVLM_DIR / 'config.json'} is not a SmolVLM config: {e}") from None
    cfg = config_from_lerobot(config, vlm_config, where)
    tokenizer = SmolVLATokenizer.from_file(path / "tokenizer.json", cfg.max_text_len)
    norms = []
    for name in NORM_KEYS:
        mean, std = weights.get(f"{name}mean"), weights.get(f"{name}std")
        if mean is None or std is None:
            raise UserError(f"checkpoint {path}: model.safetensors has no {name}mean / {name}std")
        norms.append(MeanStdNormalizer(mean, std, 1e-8))
    model = SmolVLAPolicy(cfg, vlm_config, *norms, tokenizer)
    check_state_dict(model, weights, f"checkpoint {path}: model.safetensors")
    model.load_state_dict(weights, strict=True)
    return model
