"""SAC Flow on a real ManiSkill task through the CLI: runs end to end from scratch, resumes, refuses bad configs."""

from __future__ import annotations

import json
import math

import pytest

from tests.test_cli import assert_user_error, run_cli


def sac_args(out, *extra: str) -> list[str]:
    # 12-step episodes end by truncation inside every iteration: n-step flushes and resets are exercised
    return ["rl", "--config", "configs/sac_flow_pushcube_state_cpu.yaml", "--out", str(out), "--num-envs", "2",
            "--rollout-chunks", "3", "--max-episode-steps", "12", "--minibatch", "4", "--learning-starts", "4",
            "--n-step", "2", "--sac-hidden", "32", "--buffer-size", "64", "--eval-episodes", "1", "--eval-envs", "1",
            "--eval-every", "0", "--save-every", "1", "--threads", "1", *extra]


def read_metrics(out) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval" not in r], [r for r in rows if "eval" in r]


def test_sac_flow_runs_from_scratch_and_resumes(tmp_path):
    out = tmp_path / "run"
    args = sac_args(out, "--velocity", "flow_t")
    proc = run_cli(*args, "--total-env-steps", "48")
    assert proc.returncode == 0, proc.stderr
    rows, evals = read_metrics(out)
    # 2 envs x 3 chunks x 4 actions = 24 env steps per iteration; learning starts after 4 transitions
    assert [r["update"] for r in rows] == [1, 2] and rows[-1]["env_steps"] == 48
    assert all(math.isfinite(v) for r in rows for v in r.values())
    assert rows[-1]["updates"] > 0 and "actor_loss" in rows[-1]
    assert [e["update"] for e in evals] == [2] and evals[0]["eval"]["episodes"] == 1
    state = json.loads((out / "sac_state.json").read_text())
    assert state["trained_by"].endswith("sac_flow") and state["replay_size"] == 12
    assert (out / "tb").is_dir()
    assert_user_error(run_cli(*args, "--total-env-steps", "72"), "--resume")
    assert_user_error(run_cli(*sac_args(out, "--velocity", "plain"), "--total-env-steps", "72", "--resume"),
                      "velocity")
    proc = run_cli(*args, "--total-env-steps", "72", "--resume")
    assert proc.returncode == 0, proc.stderr
    more, _ = read_metrics(out)
    assert [r["update"] for r in more] == [1, 2, 3] and more[-1]["env_steps"] == 72
    assert json.loads((out / "sac_state.json").read_text())["replay_size"] == 18


@pytest.mark.parametrize("flags,fragment", [
    (["--velocity", "flow_x"], "unknown velocity"),
    (["--ckpt", "checkpoints/pushcube_state_fewshot", "--velocity", "gaussian"], "flow_g, flow_t, plain, not gaussian"),
    (["--sac-bc-coef", "1"], "give it with --ckpt"),
    (["--ckpt", "no/such/ckpt"], "does not exist"),
    (["--tau", "0"], "tau"),
    (["--sac-std-min", "0.5", "--sac-std-max", "0.1"], "sac_std_min <= sac_std_max"),
])
def test_bad_sac_flow_configs_get_one_line_errors(tmp_path, flags, fragment):
    out = tmp_path / "o"
    assert_user_error(run_cli(*sac_args(out), *flags), fragment)
    assert not out.exists()


@pytest.mark.parametrize("velocity,flag", [("flow_g", "velocity_gate"), ("flow_t", "velocity_decoder")])
def test_sac_flow_from_the_sft_checkpoint_writes_a_checkpoint_that_eval_reads(tmp_path, velocity, flag):
    """Flow-G (a gate) or Flow-T (a decoder) wraps the checkpoint's velocity; the run is a checkpoint of a model
    that carries it, so eval reads it (and, for the decoder, export's parity check passes on it)."""
    out = tmp_path / "run"
    proc = run_cli("rl", "--config", "configs/sac_flow_pushcube_state_sft_cpu.yaml", "--out", str(out),
                   "--velocity", velocity,
                   "--num-envs", "2", "--rollout-chunks", "2", "--max-episode-steps", "24", "--minibatch", "4",
                   "--learning-starts", "2", "--sac-hidden", "32", "--buffer-size", "64", "--eval-episodes", "1",
                   "--eval-envs", "1", "--eval-every", "0", "--save-every", "1", "--threads", "1",
                   "--total-env-steps", "64", "--sac-bc-coef", "0.1", "--critic-warmup", "0", "--utd", "1")
    assert proc.returncode == 0, proc.stderr
    rows, evals = read_metrics(out)
    # 2 envs x 2 chunks x C = 8 actions: 32 env steps per iteration; the SFT policy collects from the start
    assert [r["update"] for r in rows] == [1, 2] and rows[-1]["updates"] > 0 and "actor_loss" in rows[-1]
    assert evals and evals[0]["eval"]["episodes"] == 1
    config = json.loads((out / "config.json").read_text())
    assert config["model"][flag] is True and config["info"]["start_checkpoint"].endswith("fewshot")
    assert set(config["model"]) & {"velocity_gate", "velocity_decoder"} == {flag}
    proc = run_cli("eval", "--ckpt", str(out), "--episodes", "1", "--envs", "1", "--out", str(tmp_path / "ev"))
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads((tmp_path / "ev" / "eval.json").read_text())["episodes"]) == 1
    if flag == "velocity_decoder":
        proc = run_cli("export", "--ckpt", str(out), "--steps", "2", "--out", str(tmp_path / "export"))
        assert proc.returncode == 0, proc.stderr
        assert json.loads((tmp_path / "export" / "manifest.json").read_text())["parity"]["max_abs_err"] <= 1e-4


def test_sac_flow_refuses_torchrun(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert_user_error(run_cli(*sac_args(tmp_path / "o")), "one process")
    assert not (tmp_path / "o").exists()
