"""Where a training run's scalars and results go besides its --out directory: Weights & Biases and the Hub.

Every trainer logs its scalars through one `ScalarLog`: TensorBoard in OUT/tb always, and with `--wandb PROJECT`
a W&B run too, under the same names and steps, with the run's config. `--push-to-hub REPO` uploads the finished
--out directory (policy_runtime/hub.py). Both are checked before any work; without --wandb, wandb is never imported.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sim_trainer.errors import UserError

WANDB_HINT = "pip install 'vla-rl-stack[train]'"


@dataclass(frozen=True)
class WandbSettings:
    project: str
    entity: str | None = None
    run_name: str | None = None


def add_tracking_flags(parser: argparse.ArgumentParser, what: str) -> None:
    """--wandb, --wandb-entity, --wandb-run-name and --push-to-hub; `what` names the directory pushed."""
    parser.add_argument("--wandb", metavar="PROJECT",
                        help="also log to this Weights & Biases project: the TensorBoard scalars under the same names, "
                             "and the run's config (WANDB_MODE=offline writes the run locally for `wandb sync`)")
    parser.add_argument("--wandb-entity", metavar="ENTITY", help="W&B team or user (default: your default entity)")
    parser.add_argument("--wandb-run-name", metavar="NAME", help="W&B run name (default: the --out directory's name)")
    add_push_flag(parser, what)


def add_push_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--push-to-hub", metavar="REPO",
                        help=f"when done, upload the {what} to this Hugging Face model repo (owner/name; created "
                             "private if new); load it elsewhere as hf://owner/name")


def wandb_settings(args: argparse.Namespace) -> WandbSettings | None:
    """The --wandb flags, checked before any work (the package is there, the names are not blank)."""
    if args.wandb is None:
        if args.wandb_entity is not None or args.wandb_run_name is not None:
            raise UserError("--wandb-entity and --wandb-run-name go with --wandb PROJECT")
        return None
    for flag, value in (("--wandb", args.wandb), ("--wandb-entity", args.wandb_entity),
                        ("--wandb-run-name", args.wandb_run_name)):
        if value is not None and not value.strip():
            raise UserError(f"{flag} is empty")
    if importlib.util.find_spec("wandb") is None:
        raise UserError(f"--wandb needs the wandb package, which is not installed: {WANDB_HINT}")
    return WandbSettings(args.wandb, args.wandb_entity, args.wandb_run_name)


class ScalarLog:
    """The one place training scalars are written: TensorBoard, and the W&B run when there is one."""

    def __init__(self, out: Path, job: str, config: dict[str, Any], wandb: WandbSettings | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self._run = _start_wandb(wandb, out, job, config) if wandb else None
        self._tb = SummaryWriter(str(out / "tb"))

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        for name, value in scalars.items():
            self._tb.add_scalar(name, value, step)
        if self._run is not None:
            self._run.log(dict(scalars), step=step)

    def close(self, failed: bool = False) -> None:
        self._tb.close()
        if self._run is not None:
            self._run.finish(exit_code=1 if failed else 0)
            self._run = None

    def __enter__(self) -> ScalarLog:
        return self

    def __exit__(self, exc_type, *_exc) -> None:
        self.close(failed=exc_type is not None)


def _start_wandb(settings: WandbSettings, out: Path, job: str, config: dict[str, Any]):
    import wandb

    try:
        return wandb.init(project=settings.project, entity=settings.entity, name=settings.run_name or out.name,
                          job_type=job, config=config)
    except Exception as e:  # noqa: BLE001  (no key, no route, bad entity: wandb raises several kinds)
        first = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"--wandb {settings.project}: could not start the W&B run ({type(e).__name__}: {first}); "
                        "log in with `wandb login`, or set WANDB_MODE=offline to log locally and `wandb sync` "
                        "later") from None
