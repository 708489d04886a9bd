"""Shared by the benchmark scripts: what machine and command produced a figure."""

from __future__ import annotations

import os
import platform
import shlex
import sys

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
