"""Reading a LeRobot SmolVLA policy directory: its JSON files, normaliser statistics, tokenizer and weight keys.

Every problem with what the user gave us (missing file, unreadable JSON, wrong key, unknown tokenizer) is a
UserError of one line, so the CLIs can print it and exit 2.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from sim_trainer.errors import UserError
from sim_trainer.models.vla.loader import read_json, read_safetensors

STATE_KEY, ACTION_KEY = "observation.state", "action"


def check_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], where: str,
                     skip: tuple[str, ...] = (), name: Callable[[str], str] = str) -> None:
    """Refuse weights that do not fit the model, naming every missing, unexpected and wrong-shape key at once.

    `skip`: names of the model's state (e.g. normaliser buffers) that the file is not expected to hold; `name`: the
    key as the file spells it (the error shows the user's names, not ours).
    """
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.startswith(skip)}
    missing = sorted(name(k) for k in set(expected) - set(tensors))
    unexpected = sorted(name(k) for k in set(tensors) - set(expected))
    wrong = sorted(f"{name(k)} (file {list(tensors[k].shape)}, model {list(expected[k])})"
                   for k in set(expected) & set(tensors) if tensors[k].shape != expected[k])
    problems = [f"{label}: {', '.join(keys)}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
    if problems:
        raise UserError(f"{where} does not fit the model config; " + "; ".join(problems))


class MeanStdNormalizer(nn.Module):
    """LeRobot's MEAN_STD map: (x - mean) / (std + eps), inverse x * std + mean (as its (un)normaliser steps).

    Always float32, also in a model cast to bf16: bf16 statistics would shift the normalised state by up to
    mean / std * 2^-8 (a tenth of a unit for a joint at 1.5 rad with std 0.1)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, eps: float):
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", mean.detach().float().clone())
        self.register_buffer("std", std.detach().float().clone())

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # device moves apply; dtype casts are undone below
        self.mean, self.std = self.mean.float(), self.std.float()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / (self.std + self.eps)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self.std + self.mean


def _normaliser_step(directory: Path, pipeline: str, registry_name: str) -> dict | None:
    """The step entry of one LeRobot processor pipeline (policy_preprocessor.json ...), None without the file."""
    path = directory / f"{pipeline}.json"
    if not path.exists():
        return None
    steps = read_json(path).get("steps")
    if not isinstance(steps, list):
        raise UserError(f"{path} has no list of steps")
    for step in steps:
        if isinstance(step, dict) and step.get("registry_name") == registry_name:
            return step
    return None


def _step_stats(directory: Path, step: dict, pipeline: str) -> tuple[dict[str, torch.Tensor], float]:
    config = step.get("config") or {}
    norm_map = config.get("norm_map", {})
    for feature in ("STATE", "ACTION"):
        if norm_map.get(feature, "MEAN_STD") != "MEAN_STD":
            raise UserError(f"{directory / (pipeline + '.json')}: {feature} normalisation {norm_map[feature]!r} is not "
                            f"supported for SmolVLA (MEAN_STD only)")
    state_file = step.get("state_file")
    if not isinstance(state_file, str):
        raise UserError(f"{directory / (pipeline + '.json')}: the normaliser step names no state_file")
    return read_safetensors(directory / state_file), float(config.get("eps", 1e-8))


def read_mean_std(directory: Path, weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
    """{"observation.state.mean": ..., "action.std": ...} and eps, from LeRobot's processor files.

    Older LeRobot checkpoints (before the processor pipeline) kept the same statistics as buffers inside
    model.safetensors (normalize_inputs.buffer_observation_state.mean, unnormalize_outputs.buffer_action.std, ...):
    those are read when no processor file exists.
    """
    stats: dict[str, torch.Tensor] = {}
    eps = 1e-8
    for pipeline, name in (("policy_preprocessor", "normalizer_processor"),
                           ("policy_postprocessor", "unnormalizer_processor")):
        step = _normaliser_step(directory, pipeline, name)
        if step is not None:
            found, step_eps = _step_stats(directory, step, pipeline)
            stats.update(found)
            eps = step_eps if name == "normalizer_processor" else eps
    legacy = {"normalize_inputs.buffer_observation_state": STATE_KEY, "unnormalize_outputs.buffer_action": ACTION_KEY}
    for prefix, key in legacy.items():
        for stat in ("mean", "std"):
            if f"{key}.{stat}" not in stats and f"{prefix}.{stat}" in weights:
                stats[f"{key}.{stat}"] = weights[f"{prefix}.{stat}"]
    missing = [f"{k}.{s}" for k in (STATE_KEY, ACTION_KEY) for s in ("mean", "std") if f"{k}.{s}" not in stats]
    if missing:
        raise UserError(f"{directory}: no normaliser statistics {', '.join(missing)} (expected LeRobot's "
                        f"policy_preprocessor.json / policy_postprocessor.json and their .safetensors files)")
    return stats, eps


def resolve_backbone(directory: Path, name: str) -> Path:
    """The directory holding the SmolVLM backbone's config.json (and usually its tokenizer).

    `vlm_model_name` is a directory (relative to the checkpoint directory, or absolute) or a Hugging Face Hub repo
    id, fetched into (or read from) the local Hub cache.
    """
    for candidate in (directory / name, Path(name).expanduser()):
        if (candidate / "config.json").is_file():
            return candidate
    try:
        from huggingface_hub import snapshot_download

        patterns = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
        try:
            return Path(snapshot_download(name, allow_patterns=patterns, local_files_only=True))
        except Exception:  # not in the local cache: try the Hub itself
            return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as e:
        raise UserError(f"cannot find the SmolVLM backbone {name!r} (vlm_model_name in {directory / 'config.json'}): "
                        f"not a directory, not in the local Hugging Face cache, and the Hub gave "
                        f"{type(e).__name__}: {' '.join(str(e).split())[:200]}") from None


class SmolVLATokenizer:
    """The backbone's own tokenizer (tokenizer.json), used as LeRobot's SmolVLA preprocessor uses it: a newline
    appended to the instruction, truncation to max_len, right padding with the pad token."""

    def __init__(self, backend, pad_token: str, max_len: int, where: str = "the tokenizer"):
        self.backend, self.pad_token = backend, pad_token
        self.pad_id = self.backend.token_to_id(self.pad_token)
        if self.pad_id is None:
            raise UserError(f"{where} has no pad token {self.pad_token!r}")
        self.max_len = max_len
        self.backend.enable_truncation(max_len)
        self.backend.enable_padding(length=max_len, pad_id=self.pad_id, pad_token=self.pad_token)

    @classmethod
    def from_file(cls, path: Path, max_len: int) -> SmolVLATokenizer:
        """tokenizer.json at `path`; its pad token is named by tokenizer_config.json or special_tokens_map.json."""
        from tokenizers import Tokenizer

        try:
            backend = Tokenizer.from_file(str(path))
        except Exception as e:
            raise UserError(f"cannot read the tokenizer {path}: {' '.join(str(e).split())[:200]}") from None
        return cls(backend, _pad_token(path.parent), max_len, f"tokenizer {path}")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __call__(self, instructions: list[str]) -> torch.Tensor:
        texts = [t if t.endswith("\n") else t + "\n" for t in instructions]
        return torch.tensor([e.ids for e in self.backend.encode_batch(texts)], dtype=torch.long)


def _pad_token(directory: Path) -> str:
    """The pad token named by tokenizer_config.json or special_tokens_map.json next to tokenizer.json."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = directory / name
        if path.exists():
            pad = read_json(path).get("pad_token")
            if isinstance(pad, dict):
                pad = pad.get("content")
            if isinstance(pad, str):
                return pad
    raise UserError(f"no pad token: {directory} needs tokenizer_config.json or special_tokens_map.json naming one")
