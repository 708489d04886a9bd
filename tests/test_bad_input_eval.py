"""Bad input to `sim-trainer eval`, `export` and `demo`: refused in one line before any work, nothing replaced.

Every case runs the real CLI in a subprocess on a copy of the shipped checkpoint (corrupted where the case
says so) with the working directory in tmp_path, so the default --out directories land there too; every file
under tmp_path must be byte-for-byte unchanged afterwards. The last tests run the real work: --force really
replaces, a failed export leaves the previous one intact, and `demo` twice keeps both runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from policy_runtime.artifacts import OutputLock
from tests.bad_input import ROOT, assert_refused_unchanged, run_cli, tree_hashes

SHIPPED = ROOT / "checkpoints" / "pushcube_rgb_small"
NO_CUDA = not torch.cuda.is_available()


def edit_json(path: Path, change: Callable[[dict], object], replace: bool = False) -> None:
    """Change a JSON file in place (`change` mutates it), or with `replace` write what `change` returns."""
    data = json.loads(path.read_text())
    result = change(data)
    path.write_text(json.dumps(result if replace else data))


def camera_yaml(tmp: Path, text: str) -> str:
    (tmp / "cams.yaml").write_text(text)
    return str(tmp / "cams.yaml")


def existing_export(tmp: Path) -> str:
    (tmp / "exp").mkdir()
    for name in ("policy.onnx", "manifest.json", "norm_stats.json"):
        (tmp / "exp" / name).write_text(f"an earlier export's {name}")
    return str(tmp / "exp")


def earlier_report(out: Path) -> str:
    out.mkdir(parents=True)
    (out / "eval.json").write_text('{"summary": "an earlier evaluation"}')
    return str(out)


def unwritable_dir(tmp: Path) -> str:
    if os.geteuid() == 0:
        pytest.skip("root may write anywhere")
    (tmp / "ro").mkdir()
    (tmp / "ro").chmod(0o500)
    return str(tmp / "ro" / "eval")


# (id, builder(tmp, ckpt) -> CLI arguments, expected fragment of the one stderr line)
Case = tuple[str, Callable[[Path, Path], list[str]], str]
EVAL = ["eval", "--episodes", "1", "--envs", "1"]


def ev(*extra: str) -> Callable[[Path, Path], list[str]]:
    return lambda tmp, ck: [*EVAL, "--ckpt", str(ck), "--out", str(tmp / "ev"), *extra]


def corrupt(name: str, change: Callable[[dict], object], cmd: str = "eval",
            replace: bool = False) -> Callable[[Path, Path], list[str]]:
    def build(tmp: Path, ck: Path) -> list[str]:
        edit_json(ck / name, change, replace)
        if cmd == "export":
            return ["export", "--ckpt", str(ck), "--out", str(tmp / "exp")]
        return [*EVAL, "--ckpt", str(ck), "--out", str(tmp / "ev")]
    return build


def set_model(key: str, value: object) -> Callable[[dict], None]:
    return lambda c: c["model"].__setitem__(key, value)


def shorten(block: str) -> Callable[[dict], None]:
    return lambda n: n[block].__setitem__("mean", n[block]["mean"][:-1])


CASES: list[Case] = [
    # numbers that used to fall back to defaults silently, or had no bound
    ("eval-steps-0", ev("--steps", "0"), "--steps must be between 1 and 64"),
    ("eval-steps-huge", ev("--steps", "1000000000"), "--steps must be between 1 and 64"),
    ("eval-max-steps-0", ev("--max-steps", "0"), "--max-steps must be between 1"),
    ("eval-max-steps-negative", ev("--max-steps", "-5"), "--max-steps"),
    ("eval-seed-negative", ev("--seed-start", "-1"), "--seed-start must be between 0"),
    ("eval-seed-overflow", ev("--seed-start", str(2**31)), "--seed-start"),
    ("eval-episodes-0", lambda t, c: ["eval", "--ckpt", str(c), "--episodes", "0", "--out", str(t / "ev")],
     "--episodes must be between 1"),
    ("eval-episodes-huge", lambda t, c: ["eval", "--ckpt", str(c), "--episodes", "10000000", "--out",
                                         str(t / "ev")], "--episodes"),
    ("eval-envs-0", lambda t, c: ["eval", "--ckpt", str(c), "--envs", "0", "--out", str(t / "ev")],
     "--envs must be between 1"),
    ("eval-envs-huge-cpu", lambda t, c: ["eval", "--ckpt", str(c), "--envs", "500", "--out", str(t / "ev")],
     "--envs must be between 1 and 64"),
    ("eval-threads-0", ev("--threads", "0"), "--threads must be between 1"),
    ("eval-threads-huge", ev("--threads", "100000"), "--threads must be between 1"),
    ("eval-device-unknown", ev("--device", "tpu9"), "is not a torch device"),
    ("eval-neither-ckpt-nor-export", lambda t, c: [*EVAL, "--out", str(t / "ev")], "exactly one of"),
    # the checkpoint: the wrong kind of file, then every part of it malformed
    ("eval-ckpt-is-a-file", lambda t, c: [*EVAL, "--ckpt", str(c / "config.json"), "--out", str(t / "ev")],
     "is a file, not a checkpoint directory"),
    ("eval-ckpt-missing", lambda t, c: [*EVAL, "--ckpt", str(t / "nowhere"), "--out", str(t / "ev")],
     "does not exist"),
    ("eval-ckpt-name-too-long", lambda t, c: [*EVAL, "--ckpt", str(t / ("c" * 300)), "--out", str(t / "ev")],
     "does not exist"),
    ("eval-ckpt-is-an-export", lambda t, c: [*EVAL, "--ckpt", existing_export(t), "--out", str(t / "ev")],
     "is an ONNX export (manifest.json), not a checkpoint"),
    ("eval-export-is-a-file", lambda t, c: [*EVAL, "--export", str(c / "config.json"), "--out", str(t / "ev")],
     "is a file, not an export directory"),
    ("eval-export-is-a-ckpt", lambda t, c: [*EVAL, "--export", str(c), "--out", str(t / "ev")],
     "is a checkpoint, not an export"),
    ("eval-export-with-steps", lambda t, c: [*EVAL, "--export", existing_export(t), "--steps", "2"],
     "--steps is fixed in an export"),
    ("eval-export-with-cuda", lambda t, c: [*EVAL, "--export", existing_export(t), "--device", "cuda"],
     "--device applies to --ckpt"),
    ("eval-export-with-bf16", lambda t, c: [*EVAL, "--export", existing_export(t), "--precision", "bf16"],
     "--precision applies to a --ckpt"),
    ("eval-precision-unknown", ev("--precision", "fp16"), "invalid choice: 'fp16'"),
    ("eval-weights-are-a-dir", lambda t, c: ((c / "model.safetensors").unlink(), (c / "model.safetensors").mkdir(),
                                             ev()(t, c))[-1], "model.safetensors is a directory, not a file"),
    ("config-not-json", lambda t, c: ((c / "config.json").write_text("{oops"), ev()(t, c))[-1],
     "config.json is not readable JSON"),
    ("config-a-list", corrupt("config.json", lambda c: [c], replace=True), "is not a flow-vla-checkpoint"),
    ("config-version-string", corrupt("config.json", lambda c: c.__setitem__("version", "one")),
     "version must be a whole number"),
    ("config-model-a-string", corrupt("config.json", lambda c: c.__setitem__("model", "small")),
     "model must be a mapping"),
    ("config-d-model-string", corrupt("config.json", set_model("d_model", "128")), "d_model must be a whole number"),
    ("config-horizon-0", corrupt("config.json", set_model("horizon", 0)), "horizon must be a whole number"),
    ("config-d-model-huge", corrupt("config.json", set_model("d_model", 10**9)), "d_model must be a whole number"),
    ("config-channels-a-number", corrupt("config.json", set_model("cnn_channels", 32)), "cnn_channels must be a list"),
    ("config-missing-key", corrupt("config.json", lambda c: c["model"].pop("state_dim")), "missing state_dim"),
    ("config-spec-no-task", corrupt("config.json", lambda c: c["spec"].pop("task")), "policy spec"),
    ("config-spec-disagrees", corrupt("config.json", lambda c: c["spec"].__setitem__("action_dim", 7)),
     "disagrees with itself on the action size"),
    ("norm-stats-short-state", corrupt("norm_stats.json", shorten("state")),
     "mean, std, q01 and q99 have different lengths"),
    ("norm-stats-state-one-short", corrupt("norm_stats.json", lambda n: [n["state"].__setitem__(k, v[:-1])
                                                                         for k, v in list(n["state"].items())]),
     "state statistics have 24 values but the model's state have 25"),
    ("norm-stats-strings", corrupt("norm_stats.json", lambda n: n["actions"].__setitem__("std", "wide")),
     "actions.std must be a list of numbers"),
    ("norm-stats-nan", corrupt("norm_stats.json", lambda n: n["actions"]["mean"].__setitem__(0, float("nan"))),
     "NaN or Inf"),
    ("norm-stats-negative-std", corrupt("norm_stats.json", lambda n: n["state"]["std"].__setitem__(0, -1.0)),
     "std has negative values"),
    ("norm-stats-a-list", corrupt("norm_stats.json", lambda n: [1, 2], replace=True),
     "must be a mapping with state and actions"),
    # --out: checked before the run, and never replaced without --force
    ("eval-out-is-a-file", lambda t, c: [*EVAL, "--ckpt", str(c), "--out", str(c / "config.json")],
     "is a file, not a directory"),
    ("eval-out-under-a-file", lambda t, c: [*EVAL, "--ckpt", str(c), "--out", str(c / "config.json" / "ev")],
     "not a directory"),
    ("eval-out-too-long", lambda t, c: [*EVAL, "--ckpt", str(c), "--out", str(t / ("e" * 300))], "name too long"),
    ("eval-out-unwritable", lambda t, c: [*EVAL, "--ckpt", str(c), "--out", unwritable_dir(t)], "eval"),
    ("eval-out-has-a-report", lambda t, c: [*EVAL, "--ckpt", str(c), "--out", earlier_report(t / "ev")],
     "pass --force"),
    ("eval-default-out-has-a-report", lambda t, c: (earlier_report(t / "outputs" / "eval"),
                                                    [*EVAL, "--ckpt", str(c)])[-1], "pass --force"),
    ("eval-out-is-the-ckpt", lambda t, c: [*EVAL, "--ckpt", str(c), "--out", str(c), "--force"],
     "also this run's input"),
    # camera configs: unknown names and wrong types are refused before any env worker starts
    ("camera-unknown-name", lambda t, c: ev("--camera-config", camera_yaml(t, "cameras:\n  wrist_cam: {fov: 1.0}\n"))(
        t, c), "has no camera 'wrist_cam'"),
    ("camera-pose-strings", lambda t, c: ev("--camera-config", camera_yaml(
        t, "base_camera:\n  pose: [a, b, c, 1, 0, 0, 0]\n"))(t, c), "pose must be numbers"),
    ("camera-pose-short", lambda t, c: ev("--camera-config", camera_yaml(t, "base_camera:\n  pose: [0, 0, 1]\n"))(
        t, c), "pose must be [x, y, z, qw, qx, qy, qz]"),
    ("camera-width-negative", lambda t, c: ev("--camera-config", camera_yaml(t, "base_camera:\n  width: -5\n"))(
        t, c), "width must be a whole number of pixels"),
    ("camera-intrinsic-nan", lambda t, c: ev("--camera-config", camera_yaml(
        t, "base_camera:\n  intrinsic: [[.nan, 0, 1], [0, 1, 1], [0, 0, 1]]\n"))(t, c), "finite numbers"),
    ("camera-cameras-a-list", lambda t, c: ev("--camera-config", camera_yaml(t, "cameras: [base_camera]\n"))(t, c),
     "mapping of camera name"),
    ("camera-unknown-key", lambda t, c: ev("--camera-config", camera_yaml(t, "base_camera: {zoom: 2}\n"))(t, c),
     "unknown keys ['zoom']"),
    # export
    ("export-steps-huge", lambda t, c: ["export", "--ckpt", str(c), "--steps", "1000000000", "--out", str(t / "x")],
     "at most 64"),
    ("export-steps-0", lambda t, c: ["export", "--ckpt", str(c), "--steps", "0", "--out", str(t / "x")], "at least 1"),
    ("export-out-is-the-ckpt", lambda t, c: ["export", "--ckpt", str(c), "--out", str(c)], "also this run's input"),
    ("export-out-is-the-ckpt-forced", lambda t, c: ["export", "--ckpt", str(c), "--out", str(c), "--force"],
     "also this run's input"),
    ("export-out-has-an-export", lambda t, c: ["export", "--ckpt", str(c), "--out", existing_export(t)],
     "pass --force"),
    ("export-out-is-another-ckpt", lambda t, c: ["export", "--ckpt", str(c), "--out",
                                                 str(shutil.copytree(c, t / "other")), "--force"],
     "holds a checkpoint"),
    ("export-out-is-a-file", lambda t, c: ["export", "--ckpt", str(c), "--out", str(c / "config.json")],
     "is a file, not a directory"),
    ("export-out-too-long", lambda t, c: ["export", "--ckpt", str(c), "--out", str(t / ("x" * 300))],
     "name too long"),
    ("export-ckpt-is-a-file", lambda t, c: ["export", "--ckpt", str(c / "norm_stats.json"), "--out", str(t / "x")],
     "is a file, not a checkpoint directory"),
    ("export-norm-stats-short", corrupt("norm_stats.json", shorten("actions"), cmd="export"),
     "different lengths"),
    # demo (its own numbers; its --out is a parent of fresh run directories)
    ("demo-episodes-0", lambda t, c: ["demo", "--ckpt", str(c), "--episodes", "0"], "--episodes must be between 1"),
    ("demo-seed-negative", lambda t, c: ["demo", "--ckpt", str(c), "--seed-start", "-3"], "--seed-start"),
    ("demo-ckpt-is-a-file", lambda t, c: ["demo", "--ckpt", str(c / "config.json")], "is a file"),
    ("demo-out-is-a-file", lambda t, c: ["demo", "--ckpt", str(c), "--episodes", "1", "--out",
                                         str(c / "config.json")], "is a file, not a directory"),
    ("demo-out-too-long", lambda t, c: ["demo", "--ckpt", str(c), "--episodes", "1", "--out", str(t / ("d" * 300))],
     "name too long"),
]


# Only where there is no CUDA can a CUDA request be a user mistake.
CUDA_CASES: list[Case] = [
    ("eval-device-cuda-without-cuda", ev("--device", "cuda"), "needs CUDA"),
    ("eval-physx-cuda-without-cuda", ev("--sim-backend", "physx_cuda"), "needs CUDA"),
]
PARAMS = [pytest.param(build, contains, id=name) for name, build, contains in CASES] + [
    pytest.param(build, contains, id=name, marks=pytest.mark.skipif(not NO_CUDA, reason="this host has CUDA"))
    for name, build, contains in CUDA_CASES]


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return Path(shutil.copytree(SHIPPED, tmp_path / "ckpt"))


@pytest.mark.parametrize(("build", "contains"), PARAMS)
def test_bad_input_is_refused_before_any_work(build, contains, tmp_path, ckpt):
    args = build(tmp_path, ckpt)
    assert_refused_unchanged("sim-trainer", args, watched=[tmp_path], contains=contains, cwd=tmp_path)


def test_eval_force_replaces_an_earlier_report_and_keeps_other_files(tmp_path):
    out = tmp_path / "ev"
    earlier_report(out)
    (out / "episode.gif").write_bytes(b"an earlier GIF")
    (out / "notes.txt").write_text("mine")
    args = [*EVAL, "--ckpt", str(SHIPPED), "--max-steps", "2", "--threads", "1", "--out", str(out)]
    r = run_cli("sim-trainer", [*args, "--force"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "eval.json").read_text())
    assert report["summary"]["episodes"] == 1 and report["summary"]["horizon"] == 2
    assert (out / "episode.gif").read_bytes()[:6] == b"GIF89a"
    assert (out / "notes.txt").read_text() == "mine"


def _ctrl_c_enabled() -> None:
    """In the child: SIGINT back to its default, so Python raises KeyboardInterrupt. A suite started in the
    background by a non-interactive shell (`make test &`, nohup) inherits SIGINT ignored, and Python keeps an
    ignored SIGINT ignored: the export would then finish instead of being interrupted."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_export_force_replaces_and_an_interrupted_export_leaves_the_previous_one_intact(tmp_path):
    out = tmp_path / "exp"
    r = run_cli("sim-trainer", ["export", "--ckpt", SHIPPED, "--steps", "1", "--out", out])
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("sim-trainer", ["export", "--ckpt", SHIPPED, "--steps", "2", "--out", out, "--force"])
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_steps"] == 2
    from sim_trainer.models.checkpoint import file_sha256

    assert manifest["model_sha256"] == file_sha256(out / "policy.onnx")
    assert manifest["normalisation"]["sha256"] == file_sha256(out / "norm_stats.json")

    # Interrupt a replacing export while it builds: the K=2 export must stay whole, and no build files remain.
    # The export is frozen (SIGSTOP) as soon as its build directory appears, and interrupted only if it is then
    # still mid-build (the output not yet replaced); one that finished first is tried again.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(3):
        before = tree_hashes(out)
        proc = subprocess.Popen([sys.executable, "-m", "sim_trainer.cli", "export", "--ckpt", str(SHIPPED),
                                 "--steps", "8", "--out", str(out), "--force"], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=_ctrl_c_enabled)
        try:
            wait_until(lambda: list(tmp_path.glob(".exp.export-*")) or proc.poll() is not None,  # noqa: B023
                       timeout=300, what="the export to start building")
            proc.send_signal(signal.SIGSTOP)
            mid_build = proc.poll() is None and tree_hashes(out) == before
            proc.send_signal(signal.SIGINT if mid_build else signal.SIGCONT)
            proc.send_signal(signal.SIGCONT)
            _, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
        if mid_build:
            break
    assert mid_build, "the export finished before it could be interrupted, three times"
    assert proc.returncode == 130, err[-2000:]
    assert tree_hashes(out) == before
    assert not list(tmp_path.glob(".exp.export-*"))


@pytest.mark.parametrize("command", ["eval", "export"])
def test_a_second_writer_of_one_output_is_refused(command, tmp_path):
    out = Path(existing_export(tmp_path))
    args = ([*EVAL, "--ckpt", SHIPPED] if command == "eval" else ["export", "--ckpt", SHIPPED])
    with OutputLock(out):  # this test process is the run writing `out` (a real flock, as a CLI run holds it)
        assert_refused_unchanged("sim-trainer", [*args, "--out", out, "--force"], watched=[tmp_path],
                                 contains="is being written by another run", cwd=tmp_path)


def test_demo_twice_keeps_both_runs(tmp_path):
    earlier = tmp_path / "outputs" / "demo" / "run_20000101_000000"
    earlier_report(earlier)
    before = tree_hashes(tmp_path)
    r = run_cli("sim-trainer", ["demo", "--episodes", "1", "--envs", "1"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert tree_hashes(earlier) == {k: v for k, v in before.items() if k.startswith(str(earlier))}
    runs = sorted((tmp_path / "outputs" / "demo").glob("run_*"))
    assert len(runs) == 2 and (runs[-1] / "report.md").is_file() and (runs[-1] / "eval.json").is_file()
