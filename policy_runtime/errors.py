"""User-facing errors of the runtime (kept separate from sim_trainer's so the ONNX path stays torch-free)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn


class UserError(Exception):
    """A mistake in what the user gave us (directory, key file, option, port): one line on stderr, exit 2."""


def run_command(tool: str, command: Callable[[], int]) -> int:
    """How every command line tool ends: a UserError is one line on stderr and exit 2, Ctrl-C one line and 130."""
    try:
        return command()
    except UserError as e:
        print(f"{tool}: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{tool}: interrupted", file=sys.stderr)
        return 130


class OneLineParser(argparse.ArgumentParser):
    """argparse whose own errors (unknown option, bad value) are one line like every other user mistake, exit 2.

    argparse's default prints the whole usage block first; sub-command parsers inherit this class.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
