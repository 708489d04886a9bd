"""User-facing errors: the CLI prints them as one line and exits with code 2 (no traceback).

One class for the whole project, defined in the torch-free runtime (sim_trainer may depend on
policy_runtime, never the other way round), so a runtime error raised under sim-trainer is still a
user error there.
"""

from policy_runtime.errors import UserError

__all__ = ["UserError"]
