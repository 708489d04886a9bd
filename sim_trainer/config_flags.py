"""One way to configure a training run: a dataclass, a YAML preset, and flags derived from the dataclass.

Each training command reads one config dataclass (`SFTConfig`, `RLConfig`, ...). A value comes from the field's
default, then from the YAML preset given with --config (keys are the field names), then from a flag. The flags
are built from the fields (`batch_size` -> `--batch-size`, type from the annotation, help from `option(...)`),
so a field added to a config is a preset key and a flag at once, explained in `--help` from the same line.
"""

from __future__ import annotations

import argparse
import typing
from dataclasses import MISSING, Field, field, fields
from typing import Any

from policy_runtime.yaml_io import load_yaml_mapping
from sim_trainer.errors import UserError


def option(default: Any, help: str) -> Any:
    """A config field with its help text (the one place it is written); a list default is copied per instance."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, cls: type, example: str) -> None:
    """--config, one flag per field of `cls`, and the run flags every trainer shares (--threads, --force).

    A flag left off is absent from the parsed namespace (argparse.SUPPRESS), so it never overrides the preset.
    Types are parsed here; ranges and choices are checked by the config's `validate()`, in one line.
    """
    parser.add_argument("--config", help=f"YAML preset whose keys are the option names with underscores, e.g. "
                                         f"{example}; flags override it")
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        tp = _unwrap_optional(hints[f.name])
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": _help(f)}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp)
            kwargs |= {"action": "extend", "nargs": "+", "type": item}
        else:
            kwargs["type"] = tp
        parser.add_argument(flag_name(f.name), **kwargs)
    parser.add_argument("--threads", type=int, help="torch CPU threads per process, at most this host's cores")
    parser.add_argument("--force", action="store_true", help="replace the checkpoint or run already in --out")


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """The validated config of a parsed command line: defaults < --config preset < flags."""
    given = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    return load_config(cls, args.config, given)


def load_config(cls: type, path: str | None, given: dict[str, Any]) -> Any:
    """Defaults < the YAML preset at `path` < `given` (flags); an unknown preset key is refused in one line."""
    values = load_yaml_mapping(path) if path else {}
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        what = cls.__name__.removesuffix("Config")
        raise UserError(f"unknown {what} options in {path}: {', '.join(sorted(unknown))}")
    return cls(**(values | given)).validate()  # types and ranges of every value, from the preset or a flag


def _unwrap_optional(tp: Any) -> Any:
    """`X | None` -> X: a flag always gives a value; None is a default or a preset's `null`."""
    args = typing.get_args(tp)
    if type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return inner
    return tp


def _help(f: Field) -> str:
    text = f.metadata.get("help", "")
    default = f.default_factory() if f.default_factory is not MISSING else f.default
    if default not in (None, "", [], MISSING):
        text += f" (default: {default})"
    return text.replace("%", "%%")  # argparse formats help with %
