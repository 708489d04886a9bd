"""The one YAML loader: every way a file can be wrong is one line naming the file and what it is."""

from __future__ import annotations

import os

import pytest

from policy_runtime.errors import UserError
from policy_runtime.yaml_io import dump_yaml, load_yaml_mapping
from tests.bad_input import assert_user_error, run_cli


def _fifo(tmp_path):
    path = tmp_path / "pipe.yaml"
    os.mkfifo(path)  # reading it would block forever: it must be refused before any read
    return path


def _write(name: str, data: bytes):
    def make(tmp_path):
        path = tmp_path / name
        path.write_bytes(data)
        return path
    return make


def _dir(tmp_path):
    (tmp_path / "d.yaml").mkdir()
    return tmp_path / "d.yaml"


BAD_FILES = {
    "missing": (lambda t: t / "nope.yaml", "it does not exist"),
    "directory": (_dir, "it is a directory, not a YAML file"),
    "fifo": (_fifo, "it is a named pipe, not a YAML file"),
    "binary": (_write("b.yaml", b"\xff\xfe\x00\x01" * 8), "it is not a text (YAML) file"),
    "syntax": (_write("s.yaml", b"a: 1\nb: [1, 2\n"), "is not valid YAML at line 3, column 1"),
    "list": (_write("l.yaml", b"- 1\n- 2\n"), "must be a mapping (key: value), but it is a list"),
    "empty": (_write("e.yaml", b""), "must be a mapping (key: value), but it is empty"),
    "scalar": (_write("x.yaml", b"just text\n"), "but it is a str"),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_every_bad_file_is_one_line_naming_it(tmp_path, case):
    make, message = BAD_FILES[case]
    path = make(tmp_path)
    with pytest.raises(UserError) as err:
        load_yaml_mapping(path, "trial plan")
    text = str(err.value)
    assert message in text and f"trial plan {path}" in text and "\n" not in text


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path):
    path = _write("u.yaml", b"a: 1\n")(tmp_path)
    path.chmod(0)
    with pytest.raises(UserError, match="cannot read config .*: Permission denied"):
        load_yaml_mapping(path)


def test_callers_get_their_own_error_type_and_the_mapping_round_trips(tmp_path):
    class PlanError(UserError):
        pass

    with pytest.raises(PlanError, match="does not exist"):
        load_yaml_mapping(tmp_path / "none.yaml", error=PlanError)
    data = {"z": 1, "a": {"rows": 3, "data": [1.0, 2.0]}, "name": "wrist"}
    (tmp_path / "ok.yaml").write_text(dump_yaml(data))
    assert load_yaml_mapping(tmp_path / "ok.yaml") == data
    assert dump_yaml(data).splitlines()[0] == "z: 1"  # written in the caller's key order


def test_cli_config_that_is_a_directory_says_so(tmp_path):
    (tmp_path / "preset.yaml").mkdir()
    assert_user_error(run_cli("sim-trainer", ["sft", "--config", str(tmp_path / "preset.yaml")]),
                      "is a directory, not a YAML file")
