"""User-facing errors: the CLI prints them as one line and exits with code 2 (no traceback)."""


class UserError(Exception):
    """A mistake in what the user gave us (file, config, argument), not a bug in our code."""
