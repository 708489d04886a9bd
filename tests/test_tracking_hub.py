"""Weights & Biases logging and the Hugging Face Hub, with the real CLIs and no network.

W&B runs in offline mode (WANDB_MODE=offline): the run's .wandb file is read back with wandb's own protobuf
schema, and its metric names and steps must be TensorBoard's. The Hub cannot be reached from a test, which is
what is tested: with HF_HUB_OFFLINE=1 and with an endpoint nothing listens on, an hf:// path and a push each end
in one line and exit 2, a failed push leaves the finished run or export complete on disk, and an hf:// path
already in the local Hugging Face cache is served from it offline.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tests.bad_input import assert_refused_unchanged, assert_user_error, run_cli
from tests.test_bad_input_train import TINY_SFT
from tests.test_runtime_server import tiny_export  # noqa: F401  (the session fixture: a real tiny export)
from tests.test_sac_flow_maniskill import sac_args

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: connection refused at once
REPO = "someone/tiny-policy"
TINY_RL = ["--num-envs", "1", "--rollout-chunks", "2", "--max-episode-steps", "4", "--total-env-steps", "8",
           "--minibatch", "2", "--epochs", "1", "--eval-episodes", "1", "--eval-envs", "1", "--num-steps", "1",
           "--threads", "1"]


# ----- reading what was logged ------------------------------------------------------------------------------
def wandb_records(wandb_dir: Path) -> list:
    """Every record of the one offline run under `wandb_dir`, parsed with wandb's protobuf schema.

    The .wandb file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunks (crc32, length, type;
    type 1 a whole record, 2/3/4 its first/middle/last piece), a block's tail under 7 bytes padding.
    """
    from wandb.proto.wandb_internal_pb2 import Record

    (path,) = wandb_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(wandb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} of the run's history records."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in wandb_records(wandb_dir):
        if r.WhichOneof("record_type") == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            step = items.pop("_step")
            for k, v in items.items():
                if not k.startswith("_"):
                    out.setdefault(k, []).append((step, v))
    return out


def wandb_run(wandb_dir: Path):
    (run,) = [r.run for r in wandb_records(wandb_dir) if r.WhichOneof("record_type") == "run"]
    return run


def tensorboard_scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_same_scalars(wandb_dir: Path, out: Path) -> dict[str, list[tuple[int, float]]]:
    """The W&B run holds exactly TensorBoard's scalars: the same names, steps and values (float32 in TB)."""
    wb, tb = wandb_history(wandb_dir), tensorboard_scalars(out)
    assert set(wb) == set(tb), (sorted(wb), sorted(tb))
    for name in tb:
        assert [s for s, _ in wb[name]] == [s for s, _ in tb[name]], name
        assert [v for _, v in wb[name]] == pytest.approx([v for _, v in tb[name]], rel=1e-6), name
    return wb


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch) -> Path:
    wandb_dir = tmp_path / "wandb_runs"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    return wandb_dir


@pytest.fixture
def no_hub(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache and a token, so only the network stands between a command and the Hub."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    return home


@pytest.fixture(scope="module")
def tiny_state_ckpt(state_demos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hub") / "tiny_state"
    proc = run_cli("sim-trainer", ["sft", "--data", state_demos, "--out", out, *TINY_SFT, "--steps", "2"])
    assert proc.returncode == 0, proc.stderr
    return out


# ----- Weights & Biases ---------------------------------------------------------------------------------------
def test_sft_logs_tensorboards_scalars_and_its_config_to_an_offline_wandb_run(state_demos, offline_wandb,
                                                                             tmp_path):
    out = tmp_path / "sft"
    proc = run_cli("sim-trainer", ["sft", "--data", state_demos, "--out", out, *TINY_SFT, "--steps", "3",
                                   "--log-every", "1", "--lr", "0.0005", "--wandb", "vla-tests",
                                   "--wandb-run-name", "tiny-sft"])
    assert proc.returncode == 0, proc.stderr
    history = assert_same_scalars(offline_wandb, out)
    assert {"sft/loss", "sft/grad_norm", "sft/lr", "sft/samples_per_s"} <= set(history)
    assert [s for s, _ in history["sft/loss"]] == [1, 2, 3]
    run = wandb_run(offline_wandb)
    assert (run.project, run.display_name, run.job_type) == ("vla-tests", "tiny-sft", "sft")
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["lr"] == 0.0005 and config["data"] == [str(state_demos)]
    assert config["size"] == "tiny"
    assert (out / "config.json").is_file()  # the checkpoint is what it always was


@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "sac_flow"])
def test_rl_logs_tensorboards_scalars_to_an_offline_wandb_run(algorithm, tiny_state_ckpt, offline_wandb, tmp_path):
    out = tmp_path / "rl"
    if algorithm == "sac_flow":
        args = sac_args(out, "--total-env-steps", "24", "--velocity", "flow_g")
    else:
        args = ["rl", "--ckpt", tiny_state_ckpt, "--out", out, "--algorithm", algorithm, *TINY_RL]
        if algorithm == "grpo":
            args += ["--num-envs", "2", "--group-size", "2", "--max-episode-steps", "2", "--total-env-steps", "4"]
    proc = run_cli("sim-trainer", [*args, "--wandb", "vla-tests"])
    assert proc.returncode == 0, proc.stderr
    history = assert_same_scalars(offline_wandb, out)
    assert "rl/env_steps_per_s" in history and "eval/success_once" in history
    run = wandb_run(offline_wandb)
    assert (run.project, run.display_name, run.job_type) == ("vla-tests", "rl", "rl")
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["algorithm"] == algorithm


def test_without_wandb_nothing_is_written_for_it(state_demos, offline_wandb, tmp_path):
    proc = run_cli("sim-trainer", ["sft", "--data", state_demos, "--out", tmp_path / "sft", *TINY_SFT, "--steps",
                                   "1"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert list(offline_wandb.iterdir()) == [] and not (tmp_path / "wandb").exists()


@pytest.mark.parametrize(("flags", "fragment"), [
    (["--wandb-entity", "team"], "go with --wandb PROJECT"),
    (["--wandb-run-name", "x"], "go with --wandb PROJECT"),
    (["--wandb", " "], "--wandb is empty"),
    (["--wandb", "p", "--wandb-entity", ""], "--wandb-entity is empty"),
])
def test_bad_wandb_flags_are_refused_before_work(flags, fragment, state_demos, tmp_path):
    assert_refused_unchanged("sim-trainer", ["sft", "--data", state_demos, "--out", tmp_path / "new", *flags],
                             watched=[tmp_path], contains=fragment)
    assert not (tmp_path / "new").exists()


def test_wandb_online_without_a_key_is_one_line(state_demos, tmp_path, monkeypatch):
    """Online with no API key (and no terminal to ask for one): one line saying how to log in or go offline."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    line = assert_user_error(run_cli("sim-trainer", ["sft", "--data", state_demos, "--out", tmp_path / "sft",
                                                     *TINY_SFT, "--steps", "1", "--wandb", "vla-tests"]),
                             "could not start the W&B run")
    assert "WANDB_MODE=offline" in line and "wandb login" in line


# ----- Hugging Face Hub: hf:// paths --------------------------------------------------------------------------
HUB_READERS = [
    ("sim-trainer", ["eval", "--ckpt", f"hf://{REPO}", "--episodes", "1", "--out", "{tmp}/eval"]),
    ("sim-trainer", ["eval", "--export", f"hf://{REPO}/export", "--episodes", "1", "--out", "{tmp}/eval"]),
    ("sim-trainer", ["export", "--ckpt", f"hf://{REPO}@v1", "--out", "{tmp}/export"]),
    ("sim-trainer", ["rl", "--ckpt", f"hf://{REPO}/sft", "--out", "{tmp}/rl", "--threads", "1"]),
    ("policy-runtime", ["serve", f"hf://{REPO}/export", "--bind", "tcp://127.0.0.1:0"]),
    ("policy-runtime", ["check", f"hf://{REPO}/export"]),
]
READER_IDS = ["eval-ckpt", "eval-export", "export-ckpt", "rl-ckpt", "serve", "check"]


@pytest.mark.parametrize(("tool", "args"), HUB_READERS, ids=READER_IDS)
def test_an_hf_path_offline_and_not_cached_is_one_line(tool, args, no_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = assert_refused_unchanged(tool, [a.format(tmp=tmp_path) for a in args], watched=[tmp_path],
                                    contains="HF_HUB_OFFLINE=1 is set and it is not in the local Hugging Face cache")
    assert "hf://someone/tiny-policy" in line


@pytest.mark.parametrize(("tool", "args"), HUB_READERS, ids=READER_IDS)
def test_an_hf_path_with_the_hub_unreachable_is_one_line(tool, args, no_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    assert_refused_unchanged(tool, [a.format(tmp=tmp_path) for a in args], watched=[tmp_path],
                             contains=f"the Hub at {UNREACHABLE} cannot be reached and it is not in the local "
                                      "Hugging Face cache")


@pytest.mark.parametrize(("path", "fragment"), [
    ("hf://someone", "write hf://owner/repo"),
    ("hf://someone/", "write hf://owner/repo"),
    ("hf://some one/repo", "alphanumeric"),
    ("hf://someone/repo@", "revision after @ is empty"),
    ("hf://someone/repo/../x", "may not contain"),
])
def test_a_malformed_hf_path_is_one_line_without_the_network(path, fragment, no_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    assert_refused_unchanged("policy-runtime", ["check", path], watched=[tmp_path], contains=fragment)
    assert_refused_unchanged("sim-trainer", ["rl", "--ckpt", path, "--out", tmp_path / "rl"], watched=[tmp_path],
                             contains=fragment)


def _cache_snapshot(hf_home: Path, repo: str, files: dict[str, Path]) -> None:
    """Lay out the Hugging Face cache as a download of `repo` at main would have: refs/main -> a snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    for name, src in files.items():
        dest = root / "snapshots" / commit / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(src.read_bytes())


def test_an_hf_export_in_the_cache_is_checked_offline(tiny_export, no_hub, tmp_path, monkeypatch):  # noqa: F811
    export = tiny_export[1]
    _cache_snapshot(no_hub, REPO, {f"export/{p.name}": p for p in export.iterdir() if p.is_file()})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    proc = run_cli("policy-runtime", ["check", f"hf://{REPO}/export", "--threads", "1"])
    assert proc.returncode == 0, proc.stderr
    assert "check passed" in proc.stdout
    assert_refused_unchanged("policy-runtime", ["check", f"hf://{REPO}/other"], watched=[no_hub],
                             contains="has no directory other")


# ----- Hugging Face Hub: --push-to-hub --------------------------------------------------------------------------
def test_push_offline_is_refused_before_any_work(state_demos, no_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sft = ["sft", "--data", state_demos, "--out", tmp_path / "sft", *TINY_SFT, "--steps", "1"]
    line = assert_refused_unchanged("sim-trainer", [*sft, "--push-to-hub", REPO], watched=[tmp_path],
                                    contains="HF_HUB_OFFLINE=1 is set, so nothing can be pushed")
    assert "nothing was run" in line and not (tmp_path / "sft").exists()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_TOKEN")
    assert_refused_unchanged("sim-trainer", [*sft, "--push-to-hub", REPO], watched=[tmp_path],
                             contains="needs a Hugging Face token")
    assert_refused_unchanged("sim-trainer", [*sft, "--push-to-hub", f"hf://{REPO}"], watched=[tmp_path],
                             contains="give the repo id")
    assert_refused_unchanged("sim-trainer", [*sft, "--push-to-hub", "a/b/c"], watched=[tmp_path],
                             contains="namespace/repo_name")


def test_a_failed_push_keeps_the_finished_checkpoint_and_export(tiny_state_ckpt, state_demos, no_hub, tmp_path,
                                                               monkeypatch):
    """The Hub unreachable after the work: one line, exit 2, and what was written is complete and usable."""
    from policy_runtime.export_dir import load_export
    from sim_trainer.models.checkpoint import load_checkpoint

    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    out = tmp_path / "sft"
    proc = run_cli("sim-trainer", ["sft", "--data", state_demos, "--out", out, *TINY_SFT, "--steps", "2",
                                   "--push-to-hub", REPO])
    line = assert_user_error(proc, f"could not push checkpoint to the Hub repo {REPO}")
    assert f"the checkpoint in {out} is complete on disk" in line and f"hf upload {REPO} {out}" in line
    assert "checkpoint written to" in proc.stdout
    assert load_checkpoint(out).info["step"] == 2
    assert (out / "trainer_state.json").is_file()

    export = tmp_path / "export"
    proc = run_cli("sim-trainer", ["export", "--ckpt", tiny_state_ckpt, "--out", export, "--steps", "1",
                                   "--push-to-hub", REPO])
    line = assert_user_error(proc, f"could not push export to the Hub repo {REPO}")
    assert f"the export in {export} is complete on disk" in line
    load_export(export)  # manifest, model and normalisation hashes all verify


def test_a_failed_rl_push_keeps_the_run(tiny_state_ckpt, no_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    out = tmp_path / "rl"
    proc = run_cli("sim-trainer", ["rl", "--ckpt", tiny_state_ckpt, "--out", out, *TINY_RL, "--push-to-hub", REPO])
    assert_user_error(proc, f"the RL checkpoint in {out} is complete on disk")
    assert (out / "rl_state.json").is_file() and (out / "model.safetensors").is_file()
