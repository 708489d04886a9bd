"""Progress bars that only draw for a person watching a terminal.

A bar redraws itself with carriage returns; in a log file, a CI transcript or a pipe read by a benchmark that
becomes one long line of updates. Every command makes its bars here, so they all follow the same rule.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm


def bars_disabled_by_env() -> bool:
    """TQDM_DISABLE set to anything but empty/0/false/no turns every bar off."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")


def progress_bar(iterable: Iterable | None = None, *, show: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar, off when `show` is false, when TQDM_DISABLE is set, or when stderr is not a terminal.

    An explicit `disable=` would override tqdm's own TQDM_DISABLE handling, so the choice is made here:
    True hides the bar, None lets tqdm hide it on a non-terminal.
    """
    disable = True if not show or bars_disabled_by_env() else None
    return tqdm(iterable, disable=disable, **kwargs)
