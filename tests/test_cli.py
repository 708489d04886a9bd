"""User mistakes at the command line end in one clear line and exit code 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sim_trainer.cli", *args], capture_output=True, text=True,
                          timeout=300)


def assert_user_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("sim-trainer: error")]
    assert len(lines) == 1 and fragment in lines[0], proc.stderr


def test_help_explains_the_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for cmd in ("demos", "sft", "eval", "demo"):
        assert cmd in proc.stdout


def test_unknown_task(tmp_path):
    assert_user_error(run_cli("demos", "--task", "FlyToMars-v1", "-n", "1", "--out", str(tmp_path / "d")),
                      "unknown task")


def test_missing_dataset(tmp_path):
    assert_user_error(run_cli("sft", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")),
                      "does not exist")


def test_corrupt_dataset(tmp_path):
    (tmp_path / "ds" / "episodes").mkdir(parents=True)
    (tmp_path / "ds" / "dataset.json").write_text("{not json")
    assert_user_error(run_cli("sft", "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "o")), "corrupt")


def test_bad_yaml_config(tmp_path):
    (tmp_path / "c.yaml").write_text("steps: [1, 2\n")
    assert_user_error(run_cli("sft", "--config", str(tmp_path / "c.yaml")), "not valid YAML")
    (tmp_path / "c2.yaml").write_text("stepz: 3\n")
    assert_user_error(run_cli("sft", "--config", str(tmp_path / "c2.yaml")), "unknown SFT options")


def test_corrupt_checkpoint(tiny_rgb_checkpoint, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_rgb_checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"\x01\x02" * 50)
    assert_user_error(run_cli("eval", "--ckpt", str(broken), "--episodes", "1"), "corrupt")
    assert_user_error(run_cli("eval", "--ckpt", str(tmp_path / "none"), "--episodes", "1"), "does not exist")


@pytest.mark.timeout(300)
def test_checkpoint_whose_spec_does_not_match_the_task(tiny_rgb_checkpoint, tmp_path):
    # PushCube's camera-mode state has no goal position, so the state layout differs from PickCube's.
    proc = run_cli("eval", "--ckpt", str(tiny_rgb_checkpoint), "--task", "PushCube-v1", "--episodes", "1",
                   "--envs", "1", "--out", str(tmp_path / "eval"))
    assert_user_error(proc, "does not match task PushCube-v1")
    assert "state_layout" in proc.stderr
