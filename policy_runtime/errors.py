"""User-facing errors of the runtime (kept separate from sim_trainer's so the ONNX path stays torch-free)."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user gave us (directory, key file, option, port): one line on stderr, exit 2."""
