"""How every command line tool ends on a user mistake or Ctrl-C (policy_runtime.errors.run_command)."""

from __future__ import annotations

import pytest

from policy_runtime.errors import UserError, run_command
from tests.bad_input import assert_user_error, run_cli


def _raise(exc: BaseException):
    def command() -> int:
        raise exc
    return command


def test_a_user_error_is_one_line_and_exit_2_even_when_its_message_has_several(capsys):
    assert run_command("sim-trainer", _raise(UserError("bad file x.yaml\nline 2 of the reason"))) == 2
    assert capsys.readouterr().err == "sim-trainer: error: bad file x.yaml line 2 of the reason\n"


def test_ctrl_c_is_one_line_and_exit_130_and_a_normal_end_passes_through(capsys):
    assert run_command("calibrate", _raise(KeyboardInterrupt())) == 130
    assert capsys.readouterr().err == "calibrate: interrupted\n"
    assert run_command("policy-runtime", lambda: 0) == 0


@pytest.mark.parametrize("tool, args, contains", [
    ("sim-trainer", ["sft", "--steps", "ten"], "--steps"),
    ("sim-trainer", ["bogus"], "invalid choice"),
    ("sim-trainer", ["eval", "--episodes"], "--episodes"),
    ("policy-runtime", ["serve"], "model_dir"),
    ("policy-runtime", ["check", "--nope"], "export_dir"),
    ("calibrate", ["intrinsics", "--bogus"], "required"),
])
def test_argparse_mistakes_are_one_line_in_every_tool(tool, args, contains):
    """argparse's own refusals (bad value, unknown command, missing argument) follow the one-line rule too."""
    assert_user_error(run_cli(tool, args), contains)
