"""`make gpu-check` on a host without CUDA: the CPU-able parts run briefly, the others say in one line why not."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.bad_input import ROOT

SCRIPT = ROOT / "scripts" / "gpu_check.py"
pytestmark = pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU behaviour of the check")


def run_check(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_make_gpu_check_runs_the_cpu_parts_and_names_each_skip(tmp_path):
    out = tmp_path / "check"
    res = subprocess.run(["make", "-s", "gpu-check", f"GPU_PYTHON={sys.executable}", f"GPU_CHECK_OUT={out}",
                          "GPU_CHECK_ARGS=--calls 2 --parts environment sim grpo_seeding nccl rl inference vla"],
                         cwd=ROOT, capture_output=True, text=True, timeout=400, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["cuda"] is False and report["failed"] == []
    parts = report["parts"]
    for name in ("grpo_seeding", "nccl", "rl"):  # need CUDA: one line each, saying why
        assert [r["status"] for r in parts[name]] == ["skip"]
        assert "no CUDA device" in parts[name][0]["value"]
        assert f"gpu-check: {name}: no CUDA device" in res.stdout
    sim = {r["item"]: r for r in parts["sim"]}
    assert sim["physx_cpu x1 state"]["data"]["env_steps_per_s"] > 0
    assert sim["physx_cpu x1 state"]["data"]["cpu_path_steps_per_s"] > 0  # read from BENCHMARKS.md
    inference = {r["item"]: r for r in parts["inference"]}
    assert inference["torch eager K=4"]["status"] == "ok" and inference["torch eager K=10"]["data"]["calls"] == 2
    assert inference["torch CUDA graphs K=4"]["status"] == "skip"
    assert inference["ONNX Runtime CUDA provider K=4 (IOBinding)"]["status"] == "skip"
    assert "not installed" in inference["ONNX Runtime CUDA provider K=4 (IOBinding)"]["value"]
    assert {r["item"].split()[0] for r in parts["vla"] if r["status"] == "ok"} == {"pi0", "pi05"}
    table = (out / "gpu_check.md").read_text()
    assert "| part | item | result | status |" in table and "| nccl | - | no CUDA device" in table


def test_an_expected_gpu_that_is_missing_fails_the_check(tmp_path):
    res = run_check("--out", str(tmp_path), "--parts", "environment", "--expect-gpu")
    assert res.returncode == 1, res.stdout + res.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["failed"] == ["environment: CUDA"]


def test_bad_arguments_are_one_line_errors(tmp_path):
    bad = tmp_path / "no_such_dir" / "out"
    (tmp_path / "no_such_dir").write_text("a file where a directory should be")
    res = run_check("--out", str(bad), "--parts", "environment")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.startswith("error: cannot use --out")
    res = run_check("--out", str(tmp_path / "o"), "--num-envs", "0")
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0, res.stderr
