"""Bad input to `sim-trainer demos`, `sft` and `rl`: refused before any work, and nothing already there is lost.

Every case of the table runs the real CLI in a subprocess and must end in exit code 2, one line on stderr, no
traceback, and every pre-existing file unchanged: the case's whole tmp directory (a copy of the shipped
checkpoint, a copy of a real dataset, an export directory, a plain file) and the shipped checkpoint itself.
The tests after the table check that --force really replaces, that --resume refuses another run or a
damaged state, and that a second writer of one --out is refused while the first runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.bad_input import ROOT, assert_refused_unchanged, assert_user_error, run_cli, tree_hashes

SHIPPED = ROOT / "checkpoints" / "pushcube_rgb_small"
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this host has CUDA")
TINY_SFT = ["--size", "tiny", "--batch-size", "4", "--horizon", "8", "--exec-steps", "4", "--num-steps", "2",
            "--threads", "1"]


@dataclass
class World:
    """What a case may name in its arguments ({ckpt}, {data}, ...): real artifacts, copied into tmp_path."""

    tmp: Path
    ckpt: Path  # a copy of the shipped checkpoint
    data: Path  # a copy of a real motion-planned dataset (state observations)
    export: Path  # an export directory (manifest.json, norm_stats.json, policy.onnx)
    file: Path  # a plain file
    cfg: Path  # the case's YAML file
    long: str  # a directory name too long for any file system

    def args(self, args: list[str]) -> list[str]:
        return [a.format(**vars(self)) for a in args]


@pytest.fixture
def world(tmp_path, state_demos) -> World:
    ckpt = shutil.copytree(SHIPPED, tmp_path / "pushcube_rgb_small")
    data = shutil.copytree(state_demos, tmp_path / "data")
    export = tmp_path / "export"
    export.mkdir()
    shutil.copy(ckpt / "norm_stats.json", export)
    (export / "manifest.json").write_text(json.dumps({"norm_stats_sha256": "as exported"}))
    (export / "policy.onnx").write_bytes(b"an ONNX graph")
    (tmp_path / "notes.txt").write_text("not an artifact\n")
    return World(tmp_path, ckpt, data, export, tmp_path / "notes.txt", tmp_path / "case.yaml",
                 str(tmp_path / ("x" * 300)))


SFT = ["sft", "--data", "{data}", "--out", "{tmp}/new"]
RL = ["rl", "--ckpt", "{ckpt}", "--out", "{tmp}/run"]
DEMOS = ["demos", "--task", "PickCube-v1", "--obs-mode", "state", "--out", "{tmp}/demos"]

# (id, arguments, YAML written to {cfg} first or None, fragment of the one-line message)
CASES = [
    # ---- sft: where it writes (item 11: nothing is replaced without --force; item 12: checked before work)
    ("sft-out-shipped-checkpoint", ["sft", "--data", "{data}", "--out", "{ckpt}"], None, "not empty"),
    ("sft-out-export-dir", ["sft", "--data", "{data}", "--out", "{export}"], None, "not empty"),
    ("sft-out-is-its-data", ["sft", "--data", "{data}", "--out", "{data}"], None, "input"),
    ("sft-out-is-a-file", ["sft", "--data", "{data}", "--out", "{file}"], None, "is a file"),
    ("sft-out-under-a-file", ["sft", "--data", "{data}", "--out", "{file}/ckpt"], None, "not a directory"),
    ("sft-out-too-long", ["sft", "--data", "{data}", "--out", "{long}"], None, "name too long"),
    ("sft-out-unwritable", ["sft", "--data", "{data}", "--out", "/proc/sim-trainer/ckpt"], None, "cannot create"),
    ("sft-resume-a-checkpoint-it-did-not-write", [*SFT[:3], "--out", "{ckpt}", "--resume"], None, "trainer_state"),
    ("sft-force-and-resume", [*SFT, "--force", "--resume"], None, "not both"),
    ("sft-force-over-foreign-files", [*SFT[:3], "--out", "{tmp}", "--force"], None, "notes.txt"),
    # ---- sft: its data
    ("sft-data-is-a-file", ["sft", "--data", "{file}", "--out", "{tmp}/new"], None, "is a file"),
    ("sft-data-missing", ["sft", "--data", "{tmp}/nothing", "--out", "{tmp}/new"], None, "does not exist"),
    ("sft-data-is-a-checkpoint", ["sft", "--data", "{ckpt}", "--out", "{tmp}/new"], None, "not an episode dataset"),
    # ---- sft: YAML of the wrong types and shapes (item 17: `data` as a string named "/" before)
    ("sft-yaml-data-string", ["sft", "--config", "{cfg}"], "data: {data}\nout: {tmp}/new\n", "data must be a list"),
    ("sft-yaml-eval-every-text", ["sft", "--config", "{cfg}"], "data: [{data}]\nout: {tmp}/new\neval_every: ten\n",
     "eval_every must be an integer"),
    ("sft-yaml-mix-scalar", ["sft", "--config", "{cfg}"], "data: [{data}]\nout: {tmp}/new\nmix: 0.5\n",
     "mix must be a list"),
    ("sft-yaml-lr-bool", ["sft", "--config", "{cfg}"], "data: [{data}]\nout: {tmp}/new\nlr: true\n", "lr must be"),
    ("sft-yaml-out-number", ["sft", "--config", "{cfg}"], "data: [{data}]\nout: 5\n", "out must be a string"),
    ("sft-yaml-resume-text", ["sft", "--config", "{cfg}"], "data: [{data}]\nout: {tmp}/new\nresume: maybe\n",
     "resume must be"),
    ("sft-yaml-not-a-mapping", ["sft", "--config", "{cfg}"], "- data\n- out\n", "mapping"),
    ("sft-yaml-unknown-key", ["sft", "--config", "{cfg}"], "data: [{data}]\nlearning_rate: 0.1\n", "learning_rate"),
    # ---- sft: numbers (items 12-14)
    ("sft-mix-zero", [*SFT, "--mix", "0"], None, "mix"),
    ("sft-mix-negative", [*SFT, "--mix", "-1"], None, "mix"),
    ("sft-mix-count", [*SFT, "--mix", "0.5", "0.5"], None, "one ratio per dataset"),
    ("sft-lr-negative", [*SFT, "--lr", "-1"], None, "lr must be in"),
    ("sft-lr-nan", [*SFT, "--lr", "nan"], None, "lr must be a finite number"),
    ("sft-save-every-zero", [*SFT, "--save-every", "0"], None, "save_every"),
    ("sft-image-grid-zero", [*SFT, "--image-grid", "0"], None, "image_grid"),
    ("sft-image-grid-huge", [*SFT, "--image-grid", "100000"], None, "image_grid"),
    ("sft-seed-negative", [*SFT, "--seed", "-1"], None, "seed"),
    ("sft-steps-zero", [*SFT, "--steps", "0"], None, "steps"),
    ("sft-batch-huge", [*SFT, "--batch-size", "100000000"], None, "batch_size"),
    ("sft-horizon-huge", [*SFT, "--horizon", "1000000"], None, "horizon"),
    ("sft-exec-beyond-horizon", [*SFT, "--horizon", "4", "--exec-steps", "8"], None, "cannot exceed"),
    ("sft-threads-zero", [*SFT, "--threads", "0"], None, "--threads"),
    ("sft-threads-absurd", [*SFT, "--threads", "100000"], None, "--threads"),
    ("sft-no-out", ["sft", "--data", "{data}"], None, "--out"),
    ("sft-device-tpu", [*SFT, "--device", "tpu"], None, "unknown --device 'tpu'"),
    # ---- sft / rl: precision (fp32 weights under bf16 autocast; frozen groups optionally stored in bf16)
    ("sft-precision-fp16", [*SFT, "--precision", "fp16"], None, "unknown precision 'fp16'"),
    ("sft-yaml-frozen-dtype-fp8", ["sft", "--config", "{cfg}"], "data: [{data}]\nout: {tmp}/new\nfrozen_dtype: fp8\n",
     "unknown frozen_dtype 'fp8'"),
    ("sft-frozen-bf16-under-fp32", [*SFT, "--expert-only", "--frozen-dtype", "bf16"], None, "needs precision bf16"),
    ("sft-frozen-bf16-nothing-frozen", [*SFT, "--precision", "bf16", "--frozen-dtype", "bf16"], None,
     "nothing is frozen"),
    ("sft-frozen-bf16-fsdp", [*SFT, "--precision", "bf16", "--frozen-dtype", "bf16", "--expert-only", "--fsdp"],
     None, "not supported with --fsdp"),
    ("rl-yaml-precision-half", ["rl", "--config", "{cfg}", "--out", "{tmp}/run"], "ckpt: {ckpt}\nprecision: half\n",
     "unknown precision 'half'"),
    ("rl-frozen-bf16-nothing-frozen", [*RL, "--precision", "bf16", "--frozen-dtype", "bf16"], None,
     "nothing is frozen"),
    ("rl-sac-flow-bf16", ["rl", "--algorithm", "sac_flow", "--out", "{tmp}/run", "--precision", "bf16"], None,
     "sac_flow trains in fp32 only"),
    # ---- rl: where it writes
    ("rl-out-is-its-ckpt", ["rl", "--ckpt", "{ckpt}", "--out", "{ckpt}"], None, "input"),
    ("rl-resume-into-its-ckpt", ["rl", "--ckpt", "{ckpt}", "--out", "{ckpt}", "--resume"], None, "input"),
    ("rl-out-another-checkpoint", ["rl", "--ckpt", "{ckpt}", "--out", "{export}"], None, "not empty"),
    ("rl-out-is-a-file", ["rl", "--ckpt", "{ckpt}", "--out", "{file}"], None, "is a file"),
    ("rl-out-too-long", ["rl", "--ckpt", "{ckpt}", "--out", "{long}"], None, "name too long"),
    ("rl-resume-a-dir-without-state", ["rl", "--ckpt", "{ckpt}", "--out", "{export}", "--resume"], None,
     "rl_state"),
    ("rl-force-over-foreign-files", [*RL[:3], "--out", "{tmp}", "--force"], None, "notes.txt"),
    ("rl-ckpt-is-a-file", ["rl", "--ckpt", "{file}", "--out", "{tmp}/run"], None, "is a file"),
    ("rl-cotrain-data-is-a-file", [*RL, "--cotrain-data", "{file}"], None, "is a file"),
    # ---- rl: YAML and numbers (item 14: a negative or NaN learning rate was saved with exit 0)
    ("rl-yaml-eval-every-text", ["rl", "--config", "{cfg}", "--out", "{tmp}/run"],
     "ckpt: {ckpt}\neval_every: ten\n", "eval_every must be an integer"),
    ("rl-yaml-num-envs-fraction", ["rl", "--config", "{cfg}", "--out", "{tmp}/run"],
     "ckpt: {ckpt}\nnum_envs: 8.5\n", "num_envs must be an integer"),
    ("rl-yaml-backend", ["rl", "--config", "{cfg}", "--out", "{tmp}/run"], "ckpt: {ckpt}\nsim_backend: warp\n",
     "sim_backend"),
    ("rl-lr-negative", [*RL, "--lr", "-1"], None, "lr must be in"),
    ("rl-lr-nan", [*RL, "--lr", "nan"], None, "lr must be a finite number"),
    ("rl-value-lr-inf", [*RL, "--value-lr", "inf"], None, "value_lr"),
    ("rl-target-kl-nan", [*RL, "--target-kl", "nan"], None, "target_kl"),
    ("rl-save-every-zero", [*RL, "--save-every", "0"], None, "save_every"),
    ("rl-seed-negative", [*RL, "--seed", "-1"], None, "seed"),
    ("rl-num-envs-huge", [*RL, "--num-envs", "100000"], None, "num_envs"),
    ("rl-cpu-envs-beyond-machine", [*RL, "--num-envs", "4096"], None, "CPU simulator processes"),
    ("rl-total-steps-zero", [*RL, "--total-env-steps", "0"], None, "total_env_steps"),
    ("rl-threads-zero", [*RL, "--threads", "0"], None, "--threads"),
    pytest.param("rl-cuda-without-gpu", [*RL, "--sim-backend", "physx_cuda"], None, "CUDA", marks=NO_CUDA),
    # ---- demos
    ("demos-out-shipped-checkpoint", [*DEMOS[:-1], "{ckpt}"], None, "not empty"),
    ("demos-out-existing-dataset", [*DEMOS[:-1], "{data}"], None, "already holds episodes"),
    ("demos-force-over-a-checkpoint", [*DEMOS[:-1], "{ckpt}", "--force"], None, "config.json"),
    ("demos-out-is-a-file", [*DEMOS[:-1], "{file}"], None, "is a file"),
    ("demos-out-too-long", [*DEMOS[:-1], "{long}"], None, "name too long"),
    ("demos-seed-start-negative", [*DEMOS, "--seed-start", "-1"], None, "--seed-start"),
    ("demos-num-zero", [*DEMOS, "-n", "0"], None, "-n"),
    ("demos-num-huge", [*DEMOS, "-n", "1000000000"], None, "-n"),
    ("demos-workers-zero", [*DEMOS, "--workers", "0"], None, "--workers"),
    ("demos-workers-absurd", [*DEMOS, "--workers", "100000"], None, "--workers"),
    ("demos-image-size-huge", [*DEMOS, "--image-size", "100000"], None, "--image-size"),
]


def _case_id(case) -> str:
    return case.values[0] if hasattr(case, "values") else case[0]


@pytest.mark.parametrize("name,args,yaml_text,fragment", CASES, ids=[_case_id(c) for c in CASES])
def test_bad_input_is_refused_and_changes_nothing(world, name, args, yaml_text, fragment):
    if yaml_text is not None:
        world.cfg.write_text(yaml_text.format(**vars(world)))
    assert_refused_unchanged("sim-trainer", world.args(args), watched=[world.tmp, SHIPPED], contains=fragment)


def test_every_number_of_the_trainer_configs_has_a_range():
    """A new numeric option cannot slip in unchecked: each one needs its entry in the limits table."""
    import typing

    from sim_trainer.rl.config import RL_LIMITS, RLConfig
    from sim_trainer.sft.trainer import SFT_LIMITS, SFTConfig

    for cls, limits in ((SFTConfig, SFT_LIMITS), (RLConfig, RL_LIMITS)):
        hints = typing.get_type_hints(cls)
        numeric = {name for name, tp in hints.items()
                   if {int, float, list[float]} & {tp, *typing.get_args(tp)}}
        assert numeric == set(limits), (cls.__name__, numeric ^ set(limits))


def test_a_foreign_episode_in_a_dataset_is_refused(world):
    """An episode of another task copied into a dataset is named, not trained on (it crashed in batching before)."""
    from policy_runtime.episodes import EpisodeWriter, read_episode

    ep = read_episode(next((world.data / "episodes").glob("*.h5")))
    ep.task, ep.provenance = "PushCube-v1", {"copied": "from another dataset"}
    other = EpisodeWriter(world.tmp / "other").write(ep)
    shutil.copy(other, world.data / "episodes" / "episode_000099.h5")
    assert_refused_unchanged("sim-trainer", world.args(SFT), watched=[world.tmp], contains="does not belong")


def _sft(out: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("sim-trainer", ["sft", "--data", data, "--out", out, *TINY_SFT, *extra])


def test_force_really_replaces_a_checkpoint(world):
    old = tree_hashes(world.ckpt)
    proc = _sft(world.ckpt, world.data, "--steps", "2", "--force")
    assert proc.returncode == 0, proc.stderr
    config = json.loads((world.ckpt / "config.json").read_text())
    assert config["info"]["trained_by"] == "sim-trainer sft" and config["model"]["size"] == "tiny"
    new = tree_hashes(world.ckpt)
    assert all(new[p] != h for p, h in old.items())  # config, weights and norm stats are all this run's
    assert (world.ckpt / "trainer_state.json").is_file()


def test_force_replaces_an_rl_run_without_mixing_its_metrics(world):
    """An RL --out with --force starts clean: the old metrics.jsonl would otherwise get the new run's lines."""
    ckpt = world.tmp / "tiny"
    assert _sft(ckpt, world.data, "--steps", "2").returncode == 0
    out = world.tmp / "rl"
    args = ["rl", "--ckpt", ckpt, "--out", out, "--num-envs", "1", "--rollout-chunks", "1", "--max-episode-steps",
            "4", "--total-env-steps", "4", "--minibatch", "1", "--epochs", "1", "--eval-episodes", "1",
            "--eval-envs", "1", "--num-steps", "1", "--threads", "1"]
    assert run_cli("sim-trainer", args).returncode == 0
    first = (out / "metrics.jsonl").read_text()
    assert_user_error(run_cli("sim-trainer", args), "--resume")
    proc = run_cli("sim-trainer", [*args, "--force"])
    assert proc.returncode == 0, proc.stderr
    assert len((out / "metrics.jsonl").read_text().splitlines()) == len(first.splitlines())


def test_demos_force_replaces_the_dataset(world):
    proc = run_cli("sim-trainer", [*world.args(DEMOS[:-1]), world.data, "-n", "1", "--force"])
    assert proc.returncode == 0, proc.stderr
    assert len(list((world.data / "episodes").glob("episode_*.h5"))) == 1  # the two earlier episodes are gone


@pytest.fixture
def sft_run(world) -> Path:
    """A real tiny SFT run, stopped after 2 steps with its trainer state saved."""
    out = world.tmp / "run"
    proc = _sft(out, world.data, "--steps", "2", "--save-every", "1")
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("flags,fragment", [
    (["--horizon", "4", "--exec-steps", "2"], "horizon=8"),
    (["--size", "small"], "size='tiny'"),
    (["--seed", "3"], "seed=0"),
])
def test_resume_refuses_another_run(world, sft_run, flags, fragment):
    line = assert_refused_unchanged("sim-trainer", [*_sft_args(sft_run, world.data), "--resume", *flags],
                                    watched=[world.tmp], contains=fragment)
    assert "this run has" in line  # both values are named


def test_resume_refuses_another_dataset(world, sft_run):
    other = shutil.copytree(world.data, world.tmp / "other_data")
    assert_refused_unchanged("sim-trainer", [*_sft_args(sft_run, other), "--resume"], watched=[world.tmp],
                             contains="data=")
    for p in list((other / "episodes").glob("*.h5"))[1:]:  # the same directory, since changed
        p.unlink()
    shutil.rmtree(world.data)
    other.rename(world.data)
    assert_refused_unchanged("sim-trainer", [*_sft_args(sft_run, world.data), "--resume"], watched=[world.tmp],
                             contains="episodes when the run started")


@pytest.mark.parametrize("damage,fragment", [
    ("truncate-tensors", "trainer_state.safetensors is unreadable"),
    ("truncate-json", "trainer_state.json is unreadable"),
    ("torn-pair", "different saves"),
    ("json-list", "not a JSON object"),
])
def test_damaged_resume_state_is_one_line(world, sft_run, damage, fragment):
    tensors, meta = sft_run / "trainer_state.safetensors", sft_run / "trainer_state.json"
    if damage == "truncate-tensors":
        tensors.write_bytes(tensors.read_bytes()[:1000])
    elif damage == "truncate-json":
        meta.write_text(meta.read_text()[:40])
    elif damage == "torn-pair":
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "token": "from an older save"}))
    else:
        meta.write_text("[1, 2]")
    assert_refused_unchanged("sim-trainer", [*_sft_args(sft_run, world.data), "--resume"], watched=[world.tmp],
                             contains=fragment)


def test_resume_continues_the_same_run(world, sft_run):
    proc = _sft(sft_run, world.data, "--steps", "3", "--save-every", "1", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((sft_run / "trainer_state.json").read_text())["step"] == 3


def _sft_args(out: Path, data: Path) -> list[str]:
    return ["sft", "--data", str(data), "--out", str(out), *TINY_SFT, "--steps", "3"]


def test_rl_resume_refuses_another_run_and_a_damaged_state(world):
    """The RL state is written by the trainer itself (no envs needed); the CLI must refuse to resume it wrongly."""
    from sim_trainer.rl.config import RLConfig
    from sim_trainer.rl.trainer import RLTrainer

    out = world.tmp / "rl"
    RLTrainer(RLConfig(ckpt=str(world.ckpt), out=str(out), num_envs=2, eval_envs=1)).save()
    base = ["rl", "--ckpt", str(world.ckpt), "--out", str(out), "--eval-envs", "1", "--threads", "1"]
    assert_refused_unchanged("sim-trainer", [*base, "--num-envs", "2"], watched=[world.tmp], contains="--resume")
    line = assert_refused_unchanged("sim-trainer", [*base, "--num-envs", "4", "--resume"], watched=[world.tmp],
                                    contains="num_envs=2")
    assert "num_envs=4" in line
    assert_refused_unchanged("sim-trainer", [*base, "--num-envs", "2", "--resume", "--max-episode-steps", "9"],
                             watched=[world.tmp], contains="max_episode_steps=None")
    state = out / "rl_state.safetensors"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    assert_refused_unchanged("sim-trainer", [*base, "--num-envs", "2", "--resume"], watched=[world.tmp],
                             contains="rl_state.safetensors is unreadable")


def test_a_second_writer_of_one_out_is_refused_while_the_first_runs(world):
    """Two `sft` runs into one --out both reported success before. Now the second is refused, and with --force
    it is refused by the first run's lock instead of clearing the directory under it."""
    out = world.tmp / "shared"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    first = subprocess.Popen([sys.executable, "-m", "sim_trainer.cli", *_sft_args(out, world.data)[:-1], "100000",
                              "--save-every", "100000"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        lock = out / ".lock"
        deadline = time.monotonic() + 300
        while not (lock.is_file() and lock.read_text() == str(first.pid)):  # wait for the first run's lock
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took its lock"
            time.sleep(0.2)
        others = {k: v for k, v in tree_hashes(world.tmp).items() if not k.startswith(str(out))}
        assert_user_error(run_cli("sim-trainer", [*_sft_args(out, world.data), "--force"]),
                          "being written by another run")
        assert_user_error(run_cli("sim-trainer", _sft_args(out, world.data)))
        assert first.poll() is None  # the first run goes on, its directory untouched by the refused ones
        assert lock.read_text() == str(first.pid)
        assert {k: v for k, v in tree_hashes(world.tmp).items() if not k.startswith(str(out))} == others
    finally:
        first.kill()
        first.wait()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a CUDA GPU")
def test_sft_on_cuda_without_a_gpu_is_one_line(state_demos, tmp_path):
    assert_refused_unchanged("sim-trainer", ["sft", "--data", str(state_demos), "--out", str(tmp_path / "new"),
                                             "--device", "cuda"], watched=[state_demos], contains="no CUDA GPU")
    assert not (tmp_path / "new").exists()
