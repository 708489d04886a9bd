"""Output people read: no progress-bar redraws in logs and pipes, no warnings while a server is starting, and no
"exception was never retrieved" when a ROS 2 process ends its session.
"""

from __future__ import annotations

import logging
import os
import pty
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.test_runtime_server import tiny_export  # noqa: F401  (the session fixture: a real tiny export)

ROOT = Path(__file__).resolve().parents[1]
VLA_ROS = ROOT / "ros2_ws" / "src" / "vla_ros"


def _env(**changes: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(VLA_ROS)])
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def test_a_command_writing_to_a_pipe_draws_no_progress_bar(tmp_path):
    """`sim-trainer demos` with stderr to a pipe (a log, CI, a benchmark's subprocess) and TQDM_DISABLE unset."""
    r = subprocess.run([sys.executable, "-m", "sim_trainer.cli", "demos", "--task", "PickCube-v1", "-n", "1",
                        "--obs-mode", "state", "--out", str(tmp_path / "demos")],
                       cwd=ROOT, env=_env(TQDM_DISABLE=None), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "wrote 1 demos" in r.stdout
    assert "\r" not in r.stderr and "demos PickCube-v1" not in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize(("tqdm_disable", "show", "drawn"), [
    (None, True, True),      # a person at a terminal sees the bar
    ("1", True, False),      # TQDM_DISABLE=1 turns it off, even on a terminal
    ("0", True, True),
    (None, False, False),    # the caller's own switch (e.g. only rank 0 of a multi-rank run draws)
])
def test_progress_bar_on_a_terminal(monkeypatch, tqdm_disable, show, drawn):
    from sim_trainer.progress import progress_bar

    if tqdm_disable is None:
        monkeypatch.delenv("TQDM_DISABLE", raising=False)
    else:
        monkeypatch.setenv("TQDM_DISABLE", tqdm_disable)
    main, replica = pty.openpty()
    with open(replica, "w") as terminal, open(main, "rb", buffering=0):
        monkeypatch.setattr(sys, "stderr", terminal)
        bar = progress_bar(range(3), show=show, desc="t")
        assert bar.disable is not drawn
        bar.close()


def test_progress_bar_off_a_terminal(monkeypatch, tmp_path):
    from sim_trainer.progress import progress_bar

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    with open(tmp_path / "log", "w") as log:
        monkeypatch.setattr(sys, "stderr", log)
        bar = progress_bar(range(3))
        assert bar.disable
        bar.close()


def test_the_demo_waits_for_its_server_without_handshake_warnings(tiny_export, tmp_path, caplog):  # noqa: F811
    """The demo starts the server and the nodes only once it answers; loading the model is not a fault."""
    pytest.importorskip("rclpy", reason="ROS 2 wheels not installed (pip install -e '.[ros]')")
    if str(VLA_ROS) not in sys.path:
        sys.path.insert(0, str(VLA_ROS))
    from vla_ros.demo import start_server

    from policy_runtime.client import PolicyClient
    from tests.ros_fixtures import free_port

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with caplog.at_level(logging.INFO):
        proc = start_server(tiny_export[1], endpoint, tmp_path / "server.log")
    try:
        assert proc.poll() is None
        with PolicyClient(endpoint, timeout_ms=5000, handshake_timeout_ms=5000) as client:
            assert client.ping()["uptime_s"] >= 0
    finally:
        proc.terminate()
        proc.wait(30)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_the_demo_server_start_names_a_server_that_exits(tmp_path):
    pytest.importorskip("rclpy", reason="ROS 2 wheels not installed (pip install -e '.[ros]')")
    if str(VLA_ROS) not in sys.path:
        sys.path.insert(0, str(VLA_ROS))
    from vla_ros.demo import start_server

    with pytest.raises(SystemExit, match="policy server exited with 2"):
        start_server(tmp_path / "missing", "tcp://127.0.0.1:1", tmp_path / "server.log")


# Nodes whose callbacks are busy on every worker thread when the session ends, as in `make demo`: the eval
# manager ends the session from a timer while the sim twin, policy node and safety filter are mid-callback.
_END_OF_SESSION = textwrap.dedent("""
    import gc, threading, time
    import rclpy
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.node import Node
    from std_msgs.msg import String
    from vla_ros.params import end_spin, spin_until_shutdown

    for cycle in range(4):
        rclpy.init()
        nodes = []
        for k in range(3):
            node = Node(f"busy{k}")
            pub = node.create_publisher(String, "busy", 10)
            node.create_timer(0.005, lambda pub=pub: (time.sleep(0.01), pub.publish(String(data="x"))))
            node.create_subscription(String, "busy", lambda msg: time.sleep(0.005), 10)
            nodes.append(node)
        executor = MultiThreadedExecutor(num_threads=8)
        for node in nodes:
            executor.add_node(node)
        threading.Timer(0.3, end_spin, [nodes[0]]).start()
        spin_until_shutdown(executor)
        for node in nodes:
            node.destroy_node()
        rclpy.try_shutdown()
        del executor, nodes
        gc.collect()
    print("ended", cycle + 1)
""")


def test_ending_a_session_leaves_no_unretrieved_callback_exception():
    pytest.importorskip("rclpy", reason="ROS 2 wheels not installed (pip install -e '.[ros]')")
    from tests.ros_fixtures import subprocess_env

    r = subprocess.run([sys.executable, "-c", _END_OF_SESSION], cwd=ROOT, env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ended 4" in r.stdout
    assert "never retrieved" not in r.stderr, r.stderr[-3000:]
