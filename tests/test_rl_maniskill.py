"""RL on a real ManiSkill task: runs end to end, resumes, refuses bad configs, and stays in sync over 2 ranks."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

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
    (["--fsdp"], "start the run with torchrun --nproc-per-node"),
    (["--fsdp", "--resume"], "--fsdp runs write no resumable trainer state"),
    (["--fsdp", "--algorithm", "sac_flow"], "sac_flow runs in one process"),
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


def test_fsdp_rl_over_two_gloo_ranks_matches_data_parallel(state_demos, tmp_path):
    """torchrun, 2 CPU processes (gloo), a tiny pi0 policy sharded with fully_shard: two PPO updates (expert only,
    with RL-Co's second forward) leave the gathered weights identical on both ranks, rank 0's checkpoint loads, and
    its weights are the data-parallel run's (same seeds, same global batch) up to float rounding."""
    from safetensors.torch import load_file

    from sim_trainer.models.vla.pi0 import Pi0
    from sim_trainer.sft.trainer import SFTConfig, train_sft
    from tests.test_runtime_server import free_port

    start = tmp_path / "pi0"
    train_sft(SFTConfig(data=[str(state_demos)], out=str(start), backbone="pi0-tiny", steps=1, batch_size=2,
                        horizon=8, exec_steps=4, num_steps=2, warmup=1, save_every=1))
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}

    def run(out, *extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "sim_trainer.cli",
               *rl_args(start, out, "--num-envs", "1", "--minibatch", "2", "--epochs", "1", "--total-env-steps", "48",
                        "--expert-only", "--cotrain-data", str(state_demos), "--cotrain-batch", "2", *extra)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    # saved and evaluated after each update too: the weights are gathered mid-run and sharded again
    sharded = run(tmp_path / "fsdp", "--fsdp", "--save-every", "1", "--eval-every", "1")
    assert "policy sharded over 2 processes" in sharded.stderr
    digests = re.findall(r"fsdp rank (\d): update (\d) gathered weights sha256 ([0-9a-f]{64})", sharded.stdout)
    assert sorted((u, r) for r, u, _ in digests) == [("1", "0"), ("1", "1"), ("2", "0"), ("2", "1")]
    assert all(len({d for _, u, d in digests if u == update}) == 1 for update in "12")
    assert [e["update"] for e in read_metrics(tmp_path / "fsdp")[1]] == [0, 1, 2]
    assert sharded.stdout.count("RL checkpoint written to") == 1  # rank 0 reports
    loaded = load_checkpoint(tmp_path / "fsdp")
    assert type(loaded.model) is Pi0 and loaded.info["update"] == 2
    run(tmp_path / "ddp")
    fsdp, ddp, sft = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "fsdp", tmp_path / "ddp", start))
    assert fsdp.keys() == ddp.keys()
    moved = max(float((fsdp[k] - sft[k]).abs().max()) for k in fsdp)
    apart = max(float((fsdp[k] - ddp[k]).abs().max()) for k in fsdp)
    assert moved > 1e-5 and apart < 1e-6  # measured: RL moved the weights by 4e-4, the two runs differ by 1.5e-8
    assert all(torch.equal(fsdp[k], sft[k]) for k in fsdp if k.startswith(("vision.", "lm.")))  # frozen


def test_same_seed_leaders_maps_each_repeated_seed_to_its_first_env():
    from sim_trainer.envs.vec_env import same_seed_leaders

    assert same_seed_leaders([7, 7, 9, 9, 7], range(5)) == ([1, 3, 4], [0, 2, 0])
    assert same_seed_leaders([7, 7, 9, 9], [1, 2, 3]) == ([3], [2])  # a partial reset: only the envs reset
    assert same_seed_leaders([1, 2, 3], range(3)) == ([], [])


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.parametrize("backend", [
    "physx_cpu",  # one process per env
    pytest.param("physx_cuda", marks=pytest.mark.skipif(not _cuda_available(), reason="physx_cuda needs a GPU")),
])
def test_envs_reset_with_one_seed_start_from_the_same_state(backend):
    """GRPO groups (seeds a, a, b, b) must compare episodes from one start; ManiSkill's batched reset alone
    seeds one RNG with the first seed, so the batched env copies the first env's state to the others."""
    import numpy as np
    import torch

    from sim_trainer.envs.spec import EnvConfig
    from sim_trainer.envs.vec_env import make_vec_env

    venv = make_vec_env(EnvConfig(task="PushCube-v1", obs_mode="state", sim_backend=backend), 4)
    try:
        def assert_groups(state: torch.Tensor, atol: float = 0.0) -> None:
            torch.testing.assert_close(state[1], state[0], atol=atol, rtol=0)
            torch.testing.assert_close(state[3], state[2], atol=atol, rtol=0)
            assert (state[0] - state[2]).abs().max() > 1e-3

        assert_groups(venv.reset([1_000_001, 1_000_001, 1_000_002, 1_000_002])["state"].cpu())
        obs = venv.step(torch.full((4, venv.spec.action_dim), 0.3, device=venv.device)).obs
        assert_groups(obs["state"].cpu(), atol=1e-5)  # the same start and action: the same next state, to round-off
        assert_groups(venv.reset([1_000_003, 1_000_003, 1_000_004, 1_000_004])["state"].cpu())
        venv.reset([1_000_005, 1_000_005, 1_000_006, 1_000_006], mask=np.array([False, False, True, True]))
        state = venv.reset([1_000_005, 1_000_005, 1_000_006, 1_000_006], mask=np.array([True, True, False, False]))
        assert_groups(state["state"].cpu())  # partial resets (PPO's) share starts too
    finally:
        venv.close()


def test_reset_to_states_restores_a_seeded_start_exactly():
    """The mechanism the batched env uses to share a start, run on a single CPU env (the CPU backend refuses
    several envs in one process): restoring seed a's state after a reset to seed b gives seed a's observation
    exactly, and the same action then leads to the same next observation up to float round-off (~1e-7)."""
    import torch

    from sim_trainer.envs.adapter import adapt
    from sim_trainer.envs.make import make_maniskill_env
    from sim_trainer.envs.spec import EnvConfig
    from sim_trainer.envs.vec_env import reset_to_states, take_states

    env = make_maniskill_env(EnvConfig(task="PushCube-v1", obs_mode="state"))
    try:
        def state(raw) -> torch.Tensor:
            return adapt(raw, 64, False)["state"]

        action = torch.linspace(-0.5, 0.5, env.unwrapped.single_action_space.shape[0])[None]
        start_a = state(env.reset(seed=11)[0])
        saved = take_states(env.unwrapped.get_state_dict(), torch.tensor([0]))
        next_a = state(env.step(action)[0])
        start_b = state(env.reset(seed=12)[0])
        assert not torch.equal(start_a, start_b)
        assert torch.equal(state(reset_to_states(env, saved, torch.tensor([0]))), start_a)
        torch.testing.assert_close(state(env.step(action)[0]), next_a, atol=1e-5, rtol=0)
    finally:
        env.close()


def test_privileged_state_is_maniskills_state_observation_on_both_env_paths():
    """An RGB env built with privileged=True delivers, beside the actor's images and proprio state, exactly what a
    ManiSkill obs_mode="state" env of the same seed observes (cube and goal poses included), at every step: on the
    CPU vector env (one process per env) and on the batched env class (run here on ManiSkill's CPU backend with
    one env; the CPU backend refuses several envs in one process, and this host has no GPU for physx_cuda)."""
    import torch

    from sim_trainer.envs.make import make_maniskill_env
    from sim_trainer.envs.spec import EnvConfig
    from sim_trainer.envs.vec_env import CpuVecEnv, GpuVecEnv

    cfg = EnvConfig(task="PushCube-v1", obs_mode="rgb", image_size=32)
    reference = make_maniskill_env(cfg, obs_mode="state")
    seeds = [1_000_005, 1_000_006]
    action = torch.linspace(-0.5, 0.5, 8)

    def state_obs_after(seed: int, steps: int) -> torch.Tensor:
        obs, _ = reference.reset(seed=seed)
        for _ in range(steps):
            obs = reference.step(action[None])[0]
        return obs[0]

    try:
        for venv in (CpuVecEnv(cfg, 2, privileged=True), GpuVecEnv(cfg, 1, privileged=True)):
            try:
                n = venv.num_envs
                obs = venv.reset(seeds[:n])
                for step in range(3):
                    assert obs["state"].shape == (n, venv.spec.state_dim) and set(obs["images"]) == {"base_camera"}
                    assert obs["privileged"].shape == (n, 35) and venv.spec.state_dim == 25  # + goal and cube poses
                    for i in range(n):
                        torch.testing.assert_close(obs["privileged"][i].cpu(), state_obs_after(seeds[i], step),
                                                   atol=1e-6, rtol=0)
                    obs = venv.step(action.expand(n, -1)).obs
            finally:
                venv.close()
    finally:
        reference.close()


def test_privileged_critic_run_writes_a_checkpoint_that_exports_without_it(tiny_state_checkpoint, tmp_path):
    """`--value-input privileged` end to end: the critic's simulator state travels with the rollouts, the run
    writes a loadable checkpoint whose ONNX export takes only the actor's inputs, and a resume may not swap the
    critic's input."""
    import onnx
    from safetensors.torch import load_file

    from policy_runtime.contract import graph_input_names

    out = tmp_path / "run"
    args = rl_args(tiny_state_checkpoint, out, "--value-input", "privileged", "--total-env-steps", "48",
                   "--save-every", "1")
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    updates, _ = read_metrics(out)
    assert [u["update"] for u in updates] == [1, 2]
    assert all(math.isfinite(u["value_loss"]) and u["first_ratio_max_dev"] == 0.0 for u in updates)
    state = load_file(out / "rl_state.safetensors")
    assert float(state["policy/value_head.norm.count"]) == 2 * 2 * 3  # updates x envs x chunk steps, merged
    loaded = load_checkpoint(out)
    assert loaded.info["rl_config"]["value_input"] == "privileged"
    assert not any("value_head" in k for k in loaded.model.state_dict())  # the checkpoint is the actor alone

    proc = run_cli("export", "--ckpt", str(out), "--steps", "2", "--out", str(tmp_path / "export"))
    assert proc.returncode == 0, proc.stderr
    graph = onnx.load(str(tmp_path / "export" / "policy.onnx"))
    assert [i.name for i in graph.graph.input] == graph_input_names(loaded.model.cfg.camera_names)
    assert graph.graph.input[0].type.tensor_type.shape.dim[1].dim_value == loaded.spec.state_dim

    assert_user_error(run_cli(*rl_args(tiny_state_checkpoint, out, "--total-env-steps", "96", "--resume")),
                      "value_input")
