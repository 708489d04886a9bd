"""RL on a real ManiSkill task: runs end to end, resumes, refuses bad configs, and stays in sync over 2 ranks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from sim_trainer.models.checkpoint import load_checkpoint
from tests.test_cli import assert_user_error, run_cli


@pytest.fixture(scope="module")
def tiny_state_checkpoint(state_demos, tmp_path_factory):
    from sim_trainer.sft.trainer import SFTConfig, train_sft

    out = tmp_path_factory.mktemp("ckpt") / "tiny_state"
    train_sft(SFTConfig(data=[str(state_demos)], out=str(out), size="tiny", steps=10, batch_size=8, horizon=8,
                        exec_steps=4, num_steps=2, warmup=2, save_every=10))
    return out


def rl_args(ckpt, out, *extra: str) -> list[str]:
    # 12-step episodes end by truncation inside every rollout: bootstrapping and resets are exercised
    return ["rl", "--ckpt", str(ckpt), "--out", str(out), "--num-envs", "2", "--rollout-chunks", "3",
            "--max-episode-steps", "12", "--minibatch", "4", "--epochs", "2", "--eval-episodes", "1",
            "--eval-envs", "1", "--num-steps", "2", "--threads", "1", *extra]


def read_metrics(out) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval" not in r], [r for r in rows if "eval" in r]


@pytest.mark.parametrize("algorithm,noise,extra", [
    ("ppo", "flow_noise", ["--value-input", "expert", "--eval-domain", "real_proxy"]),
    ("grpo", "flow_sde", ["--group-size", "2"]),
])
def test_rl_runs_on_maniskill_writes_a_checkpoint_and_resumes(tiny_state_checkpoint, tmp_path, algorithm, noise,
                                                              extra):
    out = tmp_path / "run"
    args = rl_args(tiny_state_checkpoint, out, "--algorithm", algorithm, "--noise", noise, *extra)
    proc = run_cli(*args, "--total-env-steps", "96", "--save-every", "1")
    assert proc.returncode == 0, proc.stderr
    updates, evals = read_metrics(out)
    # 2 envs x 3 chunks x 4 actions = 24 env steps per update (GRPO: one 12-step episode per env)
    assert [u["update"] for u in updates] == [1, 2, 3, 4]
    for u in updates:
        assert u["first_ratio_max_dev"] == 0.0
        assert all(math.isfinite(v) for k, v in u.items() if k != "explained_variance")
    assert [e["update"] for e in evals] == [0, updates[-1]["update"]]  # before and after
    if "--eval-domain" in extra:  # the shifted domain is evaluated alongside the sim, never rolled out
        assert all(e["eval_domain"]["domain"] == "real_proxy" and e["eval_domain"]["episodes"] == 1 for e in evals)
    loaded = load_checkpoint(out)
    assert loaded.model.cfg.num_steps == 2 and loaded.info["trained_by"] == "sim-trainer rl"
    # the run is refused without --resume, then resumed where it stopped
    assert_user_error(run_cli(*args, "--total-env-steps", "144"), "--resume")
    proc = run_cli(*args, "--total-env-steps", "144", "--resume")
    assert proc.returncode == 0, proc.stderr
    more, _ = read_metrics(out)
    assert [u["update"] for u in more] == list(range(1, 7))  # 144 / 24 updates, continuing from 4


@pytest.mark.parametrize("flags,fragment", [
    (["--algorithm", "a2c"], "unknown algorithm"),
    (["--num-steps", "0"], "num_steps"),
    (["--exec-steps", "9"], "cannot exceed the chunk horizon"),
    (["--noise", "langevin"], "unknown noise method"),
    (["--eval-domain", "nowhere.yaml"], "nowhere.yaml"),
])
def test_bad_rl_configs_get_one_line_errors(tiny_state_checkpoint, tmp_path, flags, fragment):
    assert_user_error(run_cli("rl", "--ckpt", str(tiny_state_checkpoint), "--out", str(tmp_path / "o"), *flags),
                      fragment)


def test_missing_checkpoint_and_unknown_preset_key(tmp_path):
    assert_user_error(run_cli("rl", "--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path / "o")),
                      "does not exist")
    preset = tmp_path / "p.yaml"
    preset.write_text("ckpt: x\nlearning_rate: 0.1\n")
    assert_user_error(run_cli("rl", "--config", str(preset), "--out", str(tmp_path / "o")), "learning_rate")


def test_two_cpu_ranks_stay_identical(tiny_state_checkpoint, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29577",
           "-m", "sim_trainer.cli", *rl_args(tiny_state_checkpoint, out, "--num-envs", "1", "--total-env-steps",
                                            "96")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    updates, _ = read_metrics(out)
    assert len(updates) == 4  # 2 ranks x 1 env x 3 chunks x 4 actions = 24 env steps per update
    assert all(u["env_steps"] == 24 * u["update"] for u in updates)
    assert all(u["rank_param_spread"] == 0.0 for u in updates)
