"""Checking a config dataclass field by field (types from its annotations, ranges from a table) before any work.

Options reach a trainer from a YAML file and from flags; both end in the same dataclass, so checking the
dataclass checks both. A YAML `eval_every: ten` or `data: data/pushcube` is refused here with one line,
not after the first update, and every number has a sane range so one typo cannot exhaust the machine.
"""

from __future__ import annotations

import math
import os
import types
import typing
from dataclasses import dataclass, fields

from sim_trainer.errors import UserError

SEED_MAX = 2**32 - 1  # numpy's and ManiSkill's seeds are unsigned 32-bit


@dataclass(frozen=True)
class Range:
    """Allowed values of a number: [lo, hi], an end open where it is meaningless (a rate of 0, an EMA of 1)."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, v: float) -> bool:
        return (v > self.lo if self.lo_open else v >= self.lo) and (v < self.hi if self.hi_open else v <= self.hi)

    def __str__(self) -> str:
        return f"{'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def cpu_process_limit() -> int:
    """Most CPU simulator processes (one per env) worth starting here: each holds its own ManiSkill."""
    return max(8, 4 * (os.cpu_count() or 1))


def check_threads(n: int | None) -> int | None:
    """--threads: at least 1 and no more than the machine's cores (more threads only contend)."""
    cores = os.cpu_count() or 1
    if n is not None and not 1 <= n <= cores:
        raise UserError(f"--threads must be in [1, {cores}] (the cores of this machine), got {n}")
    return n


def check_fields(cfg: object, limits: dict[str, Range]) -> None:
    """Check (and normalise: int -> float where a float is wanted) every field of the dataclass `cfg`.

    Types come from the annotations: bool, int, float, str, `X | None` and `list[X]`. Every number must be
    finite; a field named in `limits` must also lie in its range (each element of a list of numbers).
    """
    hints = typing.get_type_hints(type(cfg))
    for f in fields(cfg):
        value = _coerce(f.name, getattr(cfg, f.name), hints[f.name])
        setattr(cfg, f.name, value)
        rng = limits.get(f.name)
        if rng is not None and value is not None:
            for v in value if isinstance(value, list) else [value]:
                if not rng.contains(v):
                    raise UserError(f"{f.name} must be in {rng}, got {_num(v)}")


def _coerce(name: str, value: object, tp: object) -> object:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)]
        args = typing.get_args(tp)
    if typing.get_origin(tp) is list:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{name} must be a list of {_kind(args[0])}s, e.g. {name}: [...], got {value!r}")
        return [_coerce(name, v, args[0]) for v in value]
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise UserError(f"{name} must be a finite number, got {value}")
        return float(value)
    if tp is str and isinstance(value, str):
        return value
    raise UserError(f"{name} must be {_article(_kind(tp))}, got {value!r}")


def _kind(tp: object) -> str:
    return {bool: "true/false value", int: "integer", float: "number", str: "string"}.get(tp, str(tp))


def _article(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"
