"""The `sim-trainer` console script: on a robot install (no [train] extra) one line says what to install.

The base distribution is the robot side; training needs torch, ManiSkill and SAPIEN from the [train] extra.
The check reads the extra from the installed distribution's own metadata, so the list lives in pyproject.toml
only, and runs before anything from the training stack is imported.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

DISTRIBUTION = "vla-rl-stack"
HINT = f"pip install '{DISTRIBUTION}[train]'"


def missing_train_requirements() -> list[str]:
    """Distributions of the [train] extra that are not installed (none when running from a source tree)."""
    try:
        requirements = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return []
    missing = []
    for req in requirements:
        spec, _, marker = req.partition(";")
        if not re.search(r"""extra\s*==\s*["']train["']""", marker):
            continue
        name = re.match(r"[A-Za-z0-9._-]+", spec.strip()).group(0)
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def main(argv: list[str] | None = None) -> int:
    missing = missing_train_requirements()
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        print(f"sim-trainer: error: training and simulation need the [train] extra ({shown} not installed): "
              f"{HINT}", file=sys.stderr)
        return 2
    from sim_trainer.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
