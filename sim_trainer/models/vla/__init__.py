"""Real flow VLAs (pi0, pi0.5, SmolVLA) written on transformers' building blocks, loaded from LeRobot policy
directories and openpi's PyTorch checkpoints.

`load_vla(path_or_repo_id)` dispatches on config.json's "type" (none, with openpi's fields: an openpi checkpoint);
`register_vla(type, builder)` adds a type.
"""

from __future__ import annotations

from pathlib import Path

from sim_trainer.models.vla.loader import build_paligemma_policy, load_vla, register_vla
from sim_trainer.models.vla.pi0 import Pi0
from sim_trainer.models.vla.pi05 import Pi05
from sim_trainer.models.vla.smolvla import SmolVLAPolicy, load_smolvla


def _build_pi0(directory: Path, config: dict) -> Pi0:
    return build_paligemma_policy(Pi0, directory, config)


def _build_pi05(directory: Path, config: dict) -> Pi05:
    return build_paligemma_policy(Pi05, directory, config,
                                  extra={"state_prompt_dims": config.get("state_prompt_dims", "padded")})


register_vla("pi0", _build_pi0)
register_vla("pi05", _build_pi05)
register_vla("smolvla", lambda directory, config: load_smolvla(directory))

__all__ = ["Pi0", "Pi05", "SmolVLAPolicy", "load_vla", "register_vla"]
