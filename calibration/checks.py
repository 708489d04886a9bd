"""Number checks shared by the command line and the file readers: every number is finite and in its range.

A NaN slips through every `>` comparison, so a gate given as NaN is no gate at all; these checks turn
each such value into one UserError (files) or one argparse error (options) that names the value.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from policy_runtime.errors import UserError


def number(value, what: str, *, low: float | None = None, high: float | None = None,
           low_open: bool = False) -> float:
    """`value` as a finite float within [low, high] (or (low, high] with low_open); UserError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise UserError(f"{what} must be a number, got {value!r}")
    try:
        x = float(value)
    except ValueError:
        raise UserError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise UserError(f"{what} must be a finite number, got {value!r}")
    if low is not None and (x <= low if low_open else x < low):
        raise UserError(f"{what} must be {'>' if low_open else '>='} {low:g}, got {x:g}")
    if high is not None and x > high:
        raise UserError(f"{what} must be <= {high:g}, got {x:g}")
    return x


def integer(value, what: str, *, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int (a whole-number float such as 640.0 is accepted, 640.5 is not) within [low, high]."""
    x = number(value, what, low=low, high=high)
    if x != int(x):
        raise UserError(f"{what} must be a whole number, got {value!r}")
    return int(x)


def arg_number(low: float | None = None, high: float | None = None, low_open: bool = False
               ) -> Callable[[str], float]:
    """An argparse `type` that refuses NaN, infinities and values out of range in the option's own error."""
    def parse(text: str) -> float:
        try:
            return number(text, "value", low=low, high=high, low_open=low_open)
        except UserError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = "number"
    return parse


def arg_integer(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            return integer(text, "value", low=low, high=high)
        except UserError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = "integer"
    return parse
