"""Launch files vs the one-process entry point, parameter YAMLs vs the nodes, and `colcon build` of ros2_ws.

launch/launch_ros cannot be installed here, so the launch files are read as Python syntax trees: the
nodes they start (name, executable) and the parameter files they load must be the ones `vla_ros.stack`
starts from the same YAML, and every parameter in the YAMLs must be one the node declares.
"""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys

import pytest
import yaml
from vla_ros.stack import NODES, SHARED, load_params, node_names

from tests.ros_fixtures import ROOT, subprocess_env

LAUNCH = ROOT / "launch"
CASES = [("eval.launch.py", "robot_eval.yaml", "trial_plan.yaml"),
         ("sim_eval.launch.py", "sim_eval.yaml", "sim_trial_plan.yaml")]


def launch_nodes(path) -> tuple[dict[str, dict], set[str]]:
    """Node(...) calls of a launch file (name -> keyword constants and override keys), and the .yaml names used."""
    tree = ast.parse(path.read_text())
    dicts = {n.targets[0].id: {k.value for k in n.value.keys} for n in ast.walk(tree)
             if isinstance(n, ast.Assign) and isinstance(n.value, ast.Dict) and isinstance(n.targets[0], ast.Name)}
    nodes, yamls = {}, set()
    for call in ast.walk(tree):
        if isinstance(call, ast.Constant) and isinstance(call.value, str) and call.value.endswith(".yaml"):
            yamls.add(call.value)
        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "Node":
            kw = {k.arg: k.value for k in call.keywords}
            consts = {k: v.value for k, v in kw.items() if isinstance(v, ast.Constant)}
            overrides = set()
            for item in getattr(kw.get("parameters"), "elts", []):
                if isinstance(item, ast.Dict):
                    overrides |= {k.value for k in item.keys}
                elif isinstance(item, ast.Name) and item.id != "params":
                    overrides |= dicts[item.id]  # a parameter dict shared by several nodes
            assert "params" in {getattr(e, "id", None) for e in kw["parameters"].elts}, f"{path.name}: no YAML"
            nodes[consts["name"]] = {**consts, "overrides": overrides}
    return nodes, yamls


def setup_entry_points() -> dict[str, str]:
    tree = ast.parse((ROOT / "ros2_ws/src/vla_ros/setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "NODES":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no NODES table")


@pytest.mark.parametrize(("launch_file", "params_file", "plan_file"), CASES)
def test_launch_file_and_entry_point_start_the_same_nodes(launch_file, params_file, plan_file):
    nodes, yamls = launch_nodes(LAUNCH / launch_file)
    assert yamls == {params_file, plan_file}
    assert all((LAUNCH / "config" / y).is_file() for y in yamls)
    params = load_params(LAUNCH / "config" / params_file)
    assert set(nodes) == set(node_names(params))  # what vla_ros.stack starts from this YAML by default
    entry = setup_entry_points()
    declared_anywhere: set[str] = set()
    for name, node in nodes.items():
        assert node["package"] == "vla_ros"
        assert entry[node["executable"]] == NODES[name][0].rsplit(".", 1)[1], f"{name}: executable runs another node"
        declared = set(importlib.import_module(NODES[name][0]).DEFAULTS) | {"use_sim_time"}
        declared_anywhere |= declared
        unknown = (set(params[name]["ros__parameters"]) | node["overrides"]) - declared
        assert not unknown, f"{params_file}/{launch_file}: {name} has no parameter(s) {sorted(unknown)}"
    shared = set(params.get(SHARED, {}).get("ros__parameters", {}))
    assert not shared - declared_anywhere, f"{params_file}: no node reads {sorted(shared - declared_anywhere)}"
    compile((LAUNCH / launch_file).read_text(), launch_file, "exec")


def test_trial_plans_and_bad_yaml(tmp_path):
    from vla_ros.stack import StackError
    from vla_ros.trials import load_plan

    for _, _, plan in CASES:
        assert load_plan(LAUNCH / "config" / plan)
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy_node:\n  runtime_endpoint: x\n")
    with pytest.raises(StackError, match="ros__parameters"):
        load_params(bad)
    bad.write_text("policy_nod:\n  ros__parameters: {}\n")
    with pytest.raises(StackError, match="unknown node"):
        load_params(bad)
    with pytest.raises(StackError, match=r"--set 'policy_node.x=\[1,' is not valid YAML at line 1"):
        load_params(LAUNCH / "config" / CASES[0][1], ["policy_node.x=[1,"])
    r = subprocess.run([sys.executable, "-m", "vla_ros.stack", str(bad)], capture_output=True, text=True,
                       env=subprocess_env(), cwd=ROOT, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error:")


def test_colcon_build_installs_launch_files_configs_and_executables(tmp_path):
    colcon = os.path.join(os.path.dirname(sys.executable), "colcon")
    env = {**subprocess_env(), "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    r = subprocess.run([colcon, "--log-base", str(tmp_path / "log"), "build", "--base-paths", "ros2_ws/src",
                        "--build-base", str(tmp_path / "build"), "--install-base", str(tmp_path / "install")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    share = tmp_path / "install/vla_bringup/share/vla_bringup"
    assert sorted(p.name for p in (share / "launch").iterdir()) == ["eval.launch.py", "sim_eval.launch.py"]
    assert {p.name for p in (share / "config").iterdir()} == {p.name for p in (LAUNCH / "config").glob("*.yaml")}
    assert yaml.safe_load((share / "config/sim_eval.yaml").read_text()) == \
        yaml.safe_load((LAUNCH / "config/sim_eval.yaml").read_text())
    lib = tmp_path / "install/vla_ros/lib/vla_ros"
    for exe in setup_entry_points():
        assert os.access(lib / exe, os.X_OK), f"{exe} not installed as an executable"
    for pkg in ("vla_ros", "vla_bringup"):
        assert (tmp_path / f"install/{pkg}/share/ament_index/resource_index/packages/{pkg}").is_file()
    # The installed executable runs, and a bad parameter is one line on stderr and exit code 2.
    site = next((tmp_path / "install/vla_ros/lib").glob("python*/site-packages"))
    run_env = {**env, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}
    r = subprocess.run([sys.executable, str(lib / "safety_filter"), "--ros-args", "-p", "controller_type:=bogus"],
                       env=run_env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2 and "controller type must be one of" in r.stderr and r.stderr.count("\n") == 1
