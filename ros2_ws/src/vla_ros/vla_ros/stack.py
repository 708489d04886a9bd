"""The launch files' nodes in one process, from the same parameter YAML (the rclpy component container).

    python -m vla_ros.stack launch/config/sim_eval.yaml --plan launch/config/sim_trial_plan.yaml --results-dir out
    ros2 run vla_ros vla_ros_stack ...   (after colcon build)

Starts every node that has a section in the YAML (or the ones named with --nodes) on one multi-threaded
executor; `--set node.param=value` overrides a parameter. The process ends when the eval manager finishes
a session with `exit_when_done`, or on Ctrl-C. Tests, the demo and the benchmark use it; on a robot use
`ros2 launch vla_bringup eval.launch.py` (same nodes, same YAML).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from policy_runtime.errors import UserError
from policy_runtime.yaml_io import dump_yaml, load_yaml_mapping, parse_yaml

# node name in the YAML -> (module, class); the launch files start the same names (tests/test_ros_launch.py).
NODES = {
    "sim_twin": ("vla_ros.sim_twin_node", "SimTwinNode"),
    "camera": ("vla_ros.camera_node", "CameraNode"),
    "policy_node": ("vla_ros.policy_node", "PolicyNode"),
    "safety_filter": ("vla_ros.safety_node", "SafetyFilterNode"),
    "eval_manager": ("vla_ros.eval_manager_node", "EvalManagerNode"),
    "teleop": ("vla_ros.teleop_node", "TeleopNode"),
    "scripted_operator": ("vla_ros.operator_node", "ScriptedOperator"),
    "calibration_capture": ("vla_ros.capture_node", "CaptureNode"),
}


# ROS 2's wildcard section: its parameters go to every node (a value several nodes read, e.g. control_hz, is
# written once). rclpy applies it natively from the same file, and of two sections setting one parameter the
# later wins, so load_params puts it first: a node's own section and `--set` overrides win over it.
SHARED = "/**"


class StackError(UserError):
    """Bad stack configuration (YAML, node names, overrides)."""


def node_names(params: dict) -> list[str]:
    """The nodes a parameter YAML configures (its sections except the wildcard one)."""
    return [name for name in params if name != SHARED]


def load_params(path: str | Path, overrides: list[str] = ()) -> dict:
    """The ROS parameter YAML ({node: {ros__parameters: {...}}}) with `node.param=value` overrides applied."""
    data = load_yaml_mapping(path, "parameters", error=StackError)
    if not all(isinstance(v, dict) and isinstance(v.get("ros__parameters"), dict)
                                             for v in data.values()):
        raise StackError(f"{path}: every top-level key must be a node name with a `ros__parameters` mapping")
    if SHARED in data:
        data = {SHARED: data.pop(SHARED), **data}
    unknown = sorted(set(node_names(data)) - set(NODES))
    if unknown:
        raise StackError(f"{path}: unknown node(s) {unknown}; known: {sorted(NODES)}")
    for item in overrides:
        key, sep, value = item.partition("=")
        node, dot, param = key.partition(".")
        if not sep or not dot or node not in NODES:
            raise StackError(f"--set {item!r}: expected node.param=value with a known node")
        node_params = data.setdefault(node, {"ros__parameters": {}})["ros__parameters"]
        node_params[param] = parse_yaml(value, f"--set {item!r}", StackError)
    return data


def build_nodes(params: dict, names: list[str], nodes: list) -> list:
    """Construct the nodes into `nodes` (so the ones built before a failure are still cleaned up)."""
    import importlib

    for name in names:
        module, cls = NODES[name]
        nodes.append(getattr(importlib.import_module(module), cls)(name))
    return nodes


def run(params: dict, names: list[str], threads: int = 8, on_ready=None) -> int:
    """Init rclpy with the parameters, build the nodes, spin until shutdown; returns an exit code."""
    import rclpy
    from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor

    from vla_ros.params import CONFIG_ERRORS, spin_until_shutdown

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(dump_yaml(params))
    rclpy.init(args=["--ros-args", "--params-file", f.name])
    nodes = []
    try:
        try:
            build_nodes(params, names, nodes)
        except CONFIG_ERRORS as e:
            print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
            return 2
        # One node alone: its callbacks share one (mutually exclusive) group, so a pool adds only hand-offs.
        executor = SingleThreadedExecutor() if len(nodes) == 1 else MultiThreadedExecutor(num_threads=threads)
        for n in nodes:
            executor.add_node(n)
        if on_ready is not None:
            on_ready(nodes)
        spin_until_shutdown(executor)
    except KeyboardInterrupt:  # during start-up
        pass
    finally:
        for n in reversed(nodes):
            close = getattr(n, "close", None)
            if close is not None:
                close()
            n.destroy_node()
        rclpy.try_shutdown()
        Path(f.name).unlink(missing_ok=True)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m vla_ros.stack", description=__doc__.splitlines()[0])
    ap.add_argument("params", help="parameter YAML (launch/config/*.yaml)")
    ap.add_argument("--nodes", help="comma-separated node names (default: every node in the YAML)")
    ap.add_argument("--plan", help="trial plan YAML for the eval manager")
    ap.add_argument("--results-dir", help="eval manager output directory")
    ap.add_argument("--runtime", help="policy server endpoint, e.g. tcp://gpu-box:5555")
    ap.add_argument("--set", action="append", default=[], metavar="NODE.PARAM=VALUE")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    overrides = list(a.set)
    if a.plan:
        overrides.append(f"eval_manager.plan={Path(a.plan).resolve()}")
    if a.results_dir:
        overrides.append(f"eval_manager.results_dir={Path(a.results_dir).resolve()}")
    if a.runtime:
        overrides.append(f"policy_node.runtime_endpoint={a.runtime}")
    try:
        params = load_params(a.params, overrides)
        names = a.nodes.split(",") if a.nodes else node_names(params)
        bad = [n for n in names if n not in NODES]
        if bad:
            raise StackError(f"unknown node(s) {bad}; known: {sorted(NODES)}")
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run(params, names)


if __name__ == "__main__":
    sys.exit(main())
