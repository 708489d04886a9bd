"""The one YAML reader and writer of the project: presets, domains, calibration files, trial plans, stack params.

Every way a file can be wrong is one UserError line that names the file and what is wrong with it (missing,
a directory or another kind of file, unreadable, binary, invalid YAML at a line, not a mapping), so each
command prints it as it is. Callers with their own error type (a ROS node's config error) pass `error`.
Torch-free: the robot side reads its files with it too.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import yaml

from policy_runtime.errors import UserError

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def load_yaml_mapping(path: str | Path, what: str = "config", error: type[UserError] = UserError) -> dict:
    """The YAML file at `path` as a dict (`what` names it in messages: "camera file", "trial plan")."""
    data = parse_yaml(_read_text(path, what, error), f"{what} {path}", error)
    if not isinstance(data, dict):
        got = "empty" if data is None else f"a {type(data).__name__}"
        raise error(f"{what} {path} must be a mapping (key: value), but it is {got}")
    return data


def parse_yaml(text: str, where: str, error: type[UserError] = UserError):
    """YAML text to Python values; a syntax error names the line (and column) where `where` goes wrong."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise error(f"{where} is not valid YAML{at}: {problem}") from None


def dump_yaml(data: dict) -> str:
    """The project's YAML style: keys in the given order, short lists inline (matrices stay readable)."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=160)


def _read_text(path: str | Path, what: str, error: type[UserError]) -> str:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"cannot read {what} {path}: it does not exist") from None
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}") from None
    for is_kind, kind in _KINDS:
        if is_kind(mode):
            raise error(f"cannot read {what} {path}: it is {kind}, not a YAML file")
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise error(f"cannot read {what} {path}: it is not a text (YAML) file") from None
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}") from None
