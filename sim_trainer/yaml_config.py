"""Reading a YAML file of options: every failure is one clear UserError line."""

from __future__ import annotations

from pathlib import Path

import yaml

from sim_trainer.errors import UserError


def load_yaml_mapping(path: str | Path, what: str = "config") -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{what} {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} must be a mapping of option: value")
    return data
