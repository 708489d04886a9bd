"""The robot side installs and runs without the training stack: `pip install .` into a fresh venv, no extras but
[ros], then a server on an export, a client round trip, `policy-runtime check`, the ROS 2 nodes' imports.

The venv lives in .venv-robot/ (ignored by git): it is built from scratch when the base or [ros] requirements
change, and otherwise only the project is reinstalled into it (non-editable, from a copy of the tree), which
keeps a warm run to seconds. Every command runs from a directory outside the repository, so nothing is
imported from the checkout by accident.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib

from tests.test_runtime_server import tiny_export  # noqa: F401  (the session fixture: a real tiny export)

ROOT = Path(__file__).resolve().parents[1]
VLA_ROS = ROOT / "ros2_ws" / "src" / "vla_ros"
ROBOT_VENV = ROOT / ".venv-robot"

# What the [train] extra brings and a robot must not need.
TRAINING_ONLY = ("torch", "mani_skill", "sapien", "mplib", "gymnasium", "tensorboard", "safetensors", "tqdm")
RUNTIME_MODULES = ("policy_runtime.server", "policy_runtime.openpi_server", "policy_runtime.client",
                   "policy_runtime.cli", "policy_runtime.check", "policy_runtime.backends.onnx_backend",
                   "calibration.cli")
# The ROS 2 nodes a robot runs (sim_twin_node is the simulator, and the demo drives it: both need [train]).
ROS_NODE_MODULES = ("vla_ros.camera_node", "vla_ros.policy_node", "vla_ros.safety_node", "vla_ros.teleop_node",
                    "vla_ros.operator_node", "vla_ros.capture_node", "vla_ros.eval_manager_node",
                    "vla_ros.recorder", "vla_ros.trials", "vla_ros.stack")
PIP_TIMEOUT_S = 1200


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if r.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited with {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return r


def _source_copy(dest: Path) -> Path:
    """The files a build of the project reads, copied out of the checkout (no build/ or egg-info left there)."""
    pyproject = ROOT / "pyproject.toml"
    dest.mkdir()
    shutil.copy2(pyproject, dest)
    shutil.copy2(ROOT / "README.md", dest)
    with open(pyproject, "rb") as f:
        packages = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]["include"]
    for pattern in packages:
        name = pattern.rstrip("*")
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def _deps_key() -> str:
    """What the venv's third-party packages depend on: the base and [ros] requirements, and this Python."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        pyproject = tomllib.load(f)
    project = pyproject["project"]
    key = [project["dependencies"], project["optional-dependencies"]["ros"], project["requires-python"],
           pyproject["build-system"], sys.version]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


@pytest.fixture(scope="module")
def robot_python(tmp_path_factory) -> Path:
    """Python of a venv with `pip install '.[ros]'` of this tree: the robot side and the ROS 2 wheels only."""
    src = _source_copy(tmp_path_factory.mktemp("robot_src") / "vla-rl-stack")
    python = ROBOT_VENV / "bin" / "python"
    stamp = ROBOT_VENV / "deps.sha256"
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    with open(ROOT / ".venv-robot.lock", "w") as lock:  # two test runs at once share one venv
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not stamp.is_file() or stamp.read_text() != _deps_key():
            shutil.rmtree(ROBOT_VENV, ignore_errors=True)
            _run([sys.executable, "-m", "venv", str(ROBOT_VENV)])
            _run(pip + [f"{src}[ros]"], timeout=PIP_TIMEOUT_S)
            stamp.write_text(_deps_key())
        else:
            _run(pip + ["--no-deps", "--force-reinstall", str(src)], timeout=PIP_TIMEOUT_S)
    return python


def _robot_env(**extra: str) -> dict[str, str]:
    """No PYTHONPATH to the checkout; the ROS 2 package on the path as a colcon overlay would put it."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(extra)
    return env


def _python(robot_python: Path, code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return _run([str(robot_python), "-c", textwrap.dedent(code)], cwd=cwd, env=_robot_env(**env), timeout=300)


def test_the_robot_install_has_no_training_stack(robot_python, tmp_path):
    r = _python(robot_python, f"""
        import importlib.util
        print([m for m in {TRAINING_ONLY!r} if importlib.util.find_spec(m) is not None])
        """, tmp_path)
    assert r.stdout.strip() == "[]"
    _run([str(robot_python), "-m", "pip", "check"], cwd=tmp_path, env=_robot_env())


def test_runtime_calibration_and_ros_node_modules_import_without_it(robot_python, tmp_path):
    r = _python(robot_python, f"""
        import importlib, sys
        for name in {RUNTIME_MODULES + ROS_NODE_MODULES!r}:
            importlib.import_module(name)
        import policy_runtime
        print(policy_runtime.__file__)
        # the robot side reads the contract in policy_runtime: not even the trainer's torch-free modules load
        print(sorted(m for m in {TRAINING_ONLY + ("sim_trainer",)!r} if m in sys.modules))
        """, tmp_path, PYTHONPATH=str(VLA_ROS))
    installed_at, training = r.stdout.splitlines()
    assert str(ROBOT_VENV) in installed_at  # the installed copy, not the checkout
    assert training == "[]"


def test_the_robot_install_serves_an_export_to_a_client(robot_python, tiny_export, tmp_path):  # noqa: F811
    from tests.ros_fixtures import free_port

    export = tiny_export[1]
    _run([str(robot_python), "-m", "policy_runtime.cli", "check", str(export)], cwd=tmp_path, env=_robot_env(),
         timeout=300)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen([str(robot_python), "-m", "policy_runtime.cli", "serve", str(export), "--bind",
                                   endpoint, "--warmup", "1", "--threads", "1"],
                                  cwd=tmp_path, env=_robot_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        r = _python(robot_python, f"""
            import sys
            import numpy as np
            from policy_runtime.client import PolicyClient

            with PolicyClient({endpoint!r}, timeout_ms=5000, handshake_timeout_ms=5000) as client:
                client.wait_until_up(240)
                contract = client.connect()
                images = {{c.name: np.zeros((c.height, c.width, 3), np.uint8) for c in contract.cameras}}
                reply = client.infer(images, np.zeros(contract.state_dim, np.float32))
                assert reply.actions.shape == (contract.horizon, contract.action_dim), reply.actions.shape
                assert np.isfinite(reply.actions).all()
            print("round trip", reply.actions.shape, contract.backend, "torch" in sys.modules)
            """, tmp_path)
        assert r.stdout.split()[-2:] == ["onnxruntime", "False"], r.stdout
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    assert server.returncode == 0, (tmp_path / "server.log").read_text()[-3000:]


@pytest.mark.parametrize(("command", "extra_hint"), [
    (["sim-trainer", "--help"], "pip install 'vla-rl-stack[train]'"),
    (["sim-trainer", "sft", "--config", "x.yaml"], "pip install 'vla-rl-stack[train]'"),
    (["policy-runtime", "serve", "{export}", "--backend", "torch", "--bind", "tcp://127.0.0.1:{port}"],
     "pip install 'vla-rl-stack[train]'"),
])
def test_training_commands_name_the_train_extra(robot_python, tiny_export, tmp_path, command, extra_hint):  # noqa: F811
    from tests.ros_fixtures import free_port

    exe = robot_python.parent / command[0]
    args = [a.format(export=tiny_export[1], port=free_port()) for a in command[1:]]
    r = subprocess.run([str(exe), *args], cwd=tmp_path, env=_robot_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert extra_hint in r.stderr


def test_two_onnxruntime_builds_side_by_side_are_named_in_one_warning(robot_python, tiny_export, tmp_path):  # noqa: F811
    """onnxruntime-gpu beside onnxruntime (what `pip install '.[gpu]'` would leave): its metadata is enough."""
    site = tmp_path / "site"
    dist_info = site / "onnxruntime_gpu-1.31.1.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 1.31.1\n")
    (dist_info / "top_level.txt").write_text("onnxruntime\n")
    r = _run([str(robot_python), "-m", "policy_runtime.cli", "check", str(tiny_export[1])], cwd=tmp_path,
             env=_robot_env(PYTHONPATH=str(site)), timeout=300)
    warnings = [line for line in r.stderr.splitlines() if "onnxruntime-gpu" in line]
    assert len(warnings) == 1, r.stderr
    assert "onnxruntime and onnxruntime-gpu are installed together" in warnings[0]
    assert "scripts/install_gpu_runtime.sh" in warnings[0]


def test_the_robot_model_takes_the_robots_own_urdf(robot_python, tmp_path):
    """Without ManiSkill there is no default Panda model: the nodes say which parameter to set, and take a URDF."""
    from calibration.kinematics import maniskill_panda_urdf

    urdf = maniskill_panda_urdf()  # this (training) venv has ManiSkill: a real Panda URDF, as a robot would give
    r = _python(robot_python, f"""
        from policy_runtime.errors import UserError
        from vla_ros.robot import RobotModel

        try:
            RobotModel()
        except UserError as e:
            print(e)
        print(len(RobotModel({str(urdf)!r}).limits))
        """, tmp_path, PYTHONPATH=str(VLA_ROS))
    refusal, joints = r.stdout.splitlines()
    assert "give the robot's URDF as the urdf parameter" in refusal and "[train]" in refusal
    assert int(joints) >= 7


def test_an_hf_path_on_the_robot_names_the_hub_extra(robot_python, tmp_path):
    """huggingface_hub is not in the base (it brings tqdm, httpx and a compiled hf-xet): the [hub] extra adds it."""
    r = subprocess.run([str(robot_python.parent / "policy-runtime"), "serve", "hf://someone/tiny-policy/export"],
                       cwd=tmp_path, env=_robot_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "needs huggingface_hub" in r.stderr and "pip install 'vla-rl-stack[hub]'" in r.stderr
