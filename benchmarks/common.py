"""Shared by the benchmark scripts: what machine and command produced a figure."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch


def machine_info() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def command_line() -> str:
    return "python " + shlex.join(sys.argv)


def cli(*args: str) -> None:
    """`sim-trainer ARGS` in a subprocess (this tree's code), failing the benchmark if it fails."""
    subprocess.run([sys.executable, "-m", "sim_trainer.cli", *args], check=True)


def pct(summary: dict) -> str:
    """An evaluation summary's success_once as "57% [47-66]" (Wilson 95%)."""
    lo, hi = summary["success_once_wilson95"]
    return f"{100 * summary['success_once']:.0f}% [{100 * lo:.0f}-{100 * hi:.0f}]"


def rl_finished(run: Path, budget: int) -> bool:
    """Whether an RL run reached its env-step budget (its state is also saved mid-run, for --resume)."""
    state = run / "rl_state.json"
    return state.exists() and json.loads(state.read_text())["env_steps"] >= budget
