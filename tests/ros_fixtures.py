"""Shared set-up for the ROS 2 tests: a private DDS domain on loopback, vla_ros on the path, a real policy server.

Every test run gets its own ROS_DOMAIN_ID (from the pid) and discovery limited to localhost, so parallel runs
and other ROS graphs on the machine never cross-talk. Subprocesses inherit the same environment.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VLA_ROS = ROOT / "ros2_ws" / "src" / "vla_ros"
CONFIG = ROOT / "launch" / "config"
CHECKPOINT = ROOT / "checkpoints" / "pushcube_rgb_small"

os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
if str(VLA_ROS) not in sys.path:
    sys.path.insert(0, str(VLA_ROS))

rclpy = pytest.importorskip("rclpy", reason="ROS 2 wheels not installed (pip install -e '.[ros]')")


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(VLA_ROS), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float, what: str, poll: float = 0.05):
    """Poll until predicate() is truthy; fail the test with `what` after `timeout` seconds (a bound, not a check)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def make_export(out: Path) -> Path:
    """An ONNX export of the shipped checkpoint (what the robot's policy server serves)."""
    subprocess.run([sys.executable, "-m", "sim_trainer.cli", "export", "--ckpt", str(CHECKPOINT), "--steps", "4",
                    "--out", str(out)], check=True, cwd=ROOT, capture_output=True, env=subprocess_env())
    return out


class ServerProcess:
    """`policy-runtime serve` in a subprocess, killable and restartable on the same endpoint."""

    def __init__(self, export_dir: Path, log_dir: Path, port: int | None = None):
        self.export_dir, self.log_dir = export_dir, log_dir
        self.port = port or free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 300.0) -> ServerProcess:  # a bound: a busy host imports slowly
        from policy_runtime.client import PolicyClient

        self.starts += 1
        log = open(self.log_dir / f"server_{self.starts}.log", "w")  # noqa: SIM115 (lives as long as the process)
        self.proc = subprocess.Popen([sys.executable, "-m", "policy_runtime.cli", "serve", str(self.export_dir),
                                      "--bind", self.endpoint, "--warmup", "1", "--threads", "1"],
                                     cwd=ROOT, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
        client = PolicyClient(self.endpoint, timeout_ms=500, handshake_timeout_ms=500, handshake_retries=1)
        try:
            def up() -> bool:
                if self.proc.poll() is not None:
                    pytest.fail(f"policy server exited with {self.proc.returncode}; see {log.name}")
                try:
                    client.ping()
                    return True
                except Exception:
                    return False

            wait_for(up, timeout, "the policy server to answer", poll=0.2)
        finally:
            client.close()
        return self

    def kill(self) -> None:
        """SIGKILL: the server vanishes without a goodbye, as when its host dies."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class Probe:
    """The test's own rclpy node, spun on a background thread: subscribes, publishes and calls services."""

    def __init__(self, name: str = "test_probe"):
        from rclpy.executors import MultiThreadedExecutor
        from rclpy.node import Node

        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = Node(name, context=self.context)
        self.executor = MultiThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()
        self.received: dict[str, list] = {}
        self.lock = threading.Lock()
        self.extra_nodes: list = []

    def collect(self, msg_type, topic: str, qos=10) -> list:
        box: list = []
        self.received[topic] = box

        def cb(msg) -> None:
            with self.lock:
                box.append(msg)

        self.node.create_subscription(msg_type, topic, cb, qos)
        return box

    def latest(self, topic: str):
        with self.lock:
            box = self.received.get(topic) or []
            return box[-1] if box else None

    def add_node(self, name: str, **parameters):
        """Another node on the probe's participant (a controller with its `joints`, an intruder, ...)."""
        from rclpy.node import Node
        from rclpy.parameter import Parameter

        node = Node(name, context=self.context, automatically_declare_parameters_from_overrides=True,
                    parameter_overrides=[Parameter(k, value=v) for k, v in parameters.items()])
        self.executor.add_node(node)
        self.extra_nodes.append(node)
        return node

    def call(self, srv_type, name: str, timeout: float = 30.0):
        cli = self.node.create_client(srv_type, name)
        wait_for(cli.service_is_ready, timeout, f"service {name}")
        fut = cli.call_async(srv_type.Request())
        wait_for(fut.done, timeout, f"reply of {name}")
        return fut.result()

    def close(self) -> None:
        self.executor.shutdown()
        for node in self.extra_nodes:
            node.destroy_node()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


def stack_process(params: Path, log: Path, *args: str) -> subprocess.Popen:
    """`python -m vla_ros.stack PARAMS ARGS...` in a subprocess (its own process, as on a robot)."""
    return subprocess.Popen([sys.executable, "-m", "vla_ros.stack", str(params), *args], cwd=ROOT,
                            env=subprocess_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115


def nodes_under_test():
    """rclpy with a background executor for the nodes under test, and a probe on its own participant.

    A generator for the test files' fixtures: yields (add, probe), where add(node) spins a node until the test ends.
    """
    from rclpy.executors import MultiThreadedExecutor

    rclpy.init()
    executor = MultiThreadedExecutor(num_threads=4)
    threading.Thread(target=executor.spin, daemon=True).start()
    probe = Probe()
    nodes = []

    def add(node):
        nodes.append(node)
        executor.add_node(node)
        return node

    yield add, probe
    probe.close()
    executor.shutdown()
    for n in nodes:
        close = getattr(n, "close", None)
        if close is not None:
            close()
        n.destroy_node()
    rclpy.try_shutdown()
