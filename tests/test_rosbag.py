"""rosbag2 (MCAP) recording of trials and `sim-trainer dataset import-rosbag`.

The eval manager's own bags are recorded and imported in a sim trial (test_ros_e2e.py, check_trial_bags); here:
a user's recording written with `rosbags` and imported through a topic map, the recorder's failure and
overload behaviour (real files, its real thread), and the bad-input table of the import command.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from tests.bad_input import assert_refused_unchanged, run_cli

rosbags = pytest.importorskip("rosbags")
from rosbags.rosbag2 import StoragePlugin, Writer  # noqa: E402
from rosbags.typesys import Stores, get_typestore  # noqa: E402

TS = get_typestore(Stores.ROS2_KILTED)
T = TS.types
JOINTS = ["j1", "j2", "j3"]
MAP = """cameras: {front: /cam/image}
state: {topic: /joint_states, joints: [j1, j2, j3]}
action: {topic: /arm/joint_trajectory, joints: [j1, j2, j3]}
control_hz: 10
instruction: stack the blocks
source: real
"""


def header(t_ns: int):
    return T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](sec=t_ns // 10**9, nanosec=t_ns % 10**9),
                                    frame_id="")


def write_user_bag(path: Path, seconds: float = 1.0) -> None:
    """A user's own recording: camera at 30 Hz (bgr8), joint states at 100 Hz, trajectory commands at 20 Hz."""
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        cam = w.add_connection("/cam/image", "sensor_msgs/msg/Image", typestore=TS)
        js = w.add_connection("/joint_states", "sensor_msgs/msg/JointState", typestore=TS)
        cmd = w.add_connection("/arm/joint_trajectory", "trajectory_msgs/msg/JointTrajectory", typestore=TS)
        msgs = []
        for k in range(int(seconds * 30)):
            t = 10**9 + k * 10**9 // 30
            bgr = np.full((6, 8, 3), (k, 0, 255), np.uint8)
            msgs.append((t, cam, T["sensor_msgs/msg/Image"](header=header(t), height=6, width=8, encoding="bgr8",
                                                            is_bigendian=0, step=24, data=bgr.ravel())))
        for k in range(int(seconds * 100)):
            t = 10**9 + k * 10**7
            msgs.append((t, js, T["sensor_msgs/msg/JointState"](
                header=header(t), name=["j3", "j1", "j2", "finger"], position=np.array([3.0, 1.0, 2.0, 0.0]) + k,
                velocity=np.zeros(0), effort=np.zeros(0))))
        for k in range(int(seconds * 20)):
            t = 10**9 + k * 5 * 10**7
            point = T["trajectory_msgs/msg/JointTrajectoryPoint"](
                positions=np.array([0.1, 0.2, 0.3]) * k, velocities=np.zeros(0), accelerations=np.zeros(0),
                effort=np.zeros(0), time_from_start=T["builtin_interfaces/msg/Duration"](sec=0, nanosec=50_000_000))
            msgs.append((t, cmd, T["trajectory_msgs/msg/JointTrajectory"](header=header(t), joint_names=JOINTS,
                                                                          points=[point])))
        for t, con, m in sorted(msgs, key=lambda x: x[0]):
            w.write(con, t, TS.serialize_cdr(m, con.msgtype))


def test_a_user_recording_is_sampled_at_control_hz_through_a_topic_map(tmp_path):
    from policy_runtime.episodes import dataset_spec, list_episodes, read_episode

    bag, topic_map, out = tmp_path / "my_recording", tmp_path / "map.yaml", tmp_path / "data"
    write_user_bag(bag)
    topic_map.write_text(MAP)
    r = run_cli("sim-trainer", ["dataset", "import-rosbag", bag, "--topic-map", topic_map, "--out", out])
    assert r.returncode == 0, r.stderr
    (ep,) = [read_episode(p) for p in list_episodes(out)]
    # Every stream has started at 1.0 s (all three start together); the last message is at ~1.99 s: 10 ticks.
    assert len(ep) == 10 and ep.instruction == "stack the blocks" and ep.source == "real" and ep.success
    np.testing.assert_allclose(ep.timestamps, np.arange(10) * 0.1, atol=1e-9)
    # The state at tick k is the newest joint state at 1.0 + 0.1 k s (message 10 k), by name: j1, j2, j3.
    np.testing.assert_allclose(ep.state, np.array([1.0, 2.0, 3.0]) + 10 * np.arange(10)[:, None])
    # The action after tick k is the newest command before the next tick: command 2 k + 1 (at 1.05 + 0.1 k s).
    np.testing.assert_allclose(ep.actions, np.array([0.1, 0.2, 0.3]) * (2 * np.arange(10) + 1)[:, None], rtol=1e-6)
    # Images: bgr8 -> RGB; the newest frame at or before each tick (30 Hz: frame 3 k).
    frames = ep.images["front"]
    assert frames.shape == (10, 6, 8, 3)
    np.testing.assert_array_equal(frames[:, 0, 0], np.stack([np.full(10, 255), np.zeros(10), 3 * np.arange(10)], 1))
    spec = dataset_spec(out)
    assert spec.action_dim == 3 and spec.control_hz == 10 and spec.cameras[0].name == "front"


@pytest.fixture
def bag_recorder():
    pytest.importorskip("rclpy", reason="ROS 2 wheels not installed")
    from vla_ros.bag_recorder import BagRecorder

    reports, logs, done = [], [], threading.Event()

    def on_closed(report: dict) -> None:
        reports.append(report)
        done.set()

    rec = BagRecorder(logs.append, on_closed, max_queue_bytes=1 << 20)
    yield rec, reports, logs, done
    rec.shutdown()


def joint_state_cdr(k: int) -> bytes:
    return bytes(TS.serialize_cdr(T["sensor_msgs/msg/JointState"](
        header=header(k), name=JOINTS, position=np.full(3, float(k)), velocity=np.zeros(0), effort=np.zeros(0)),
        "sensor_msgs/msg/JointState"))


def test_bag_recorder_reports_a_bag_it_cannot_write_and_records_the_next(bag_recorder, tmp_path):
    """A bag that cannot be written is reported (logged, and its report says why); the next trial's bag is fine."""
    from rosbags.rosbag2 import Reader

    rec, reports, logs, done = bag_recorder
    (tmp_path / "bags").write_text("a file where the bag directory should go")
    rec.open(tmp_path / "bags" / "trial_0000", {"trial": 0})
    rec.add("/joint_states", "sensor_msgs/msg/JointState", 1, joint_state_cdr(1))
    rec.close()
    assert done.wait(30)
    assert reports[0]["error"] and reports[0]["messages"] == 0 and "trial_0000" in logs[0]
    done.clear()
    rec.open(tmp_path / "ok" / "trial_0001", {"trial": 1})
    for k in range(5):
        rec.add("/joint_states", "sensor_msgs/msg/JointState", 10**9 + k, joint_state_cdr(k))
    rec.add_text("/vla/eval/events", 10**9 + 5, '{"event": "end"}')
    rec.close()
    assert done.wait(30)
    assert reports[1] == {"trial": 1, "path": str(tmp_path / "ok" / "trial_0001"), "messages": 6, "dropped": 0,
                          "error": None}
    with Reader(tmp_path / "ok" / "trial_0001") as reader:
        got = [(c.topic, TS.deserialize_cdr(raw, c.msgtype)) for c, _, raw in reader.messages()]
    assert [float(m.position[0]) for t, m in got if t == "/joint_states"] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert got[-1][1].data == '{"event": "end"}'


def test_bag_recorder_drops_rather_than_waits_beyond_its_queue_bound(bag_recorder, tmp_path):
    rec, reports, logs, done = bag_recorder
    rec.open(tmp_path / "trial_0000", {"trial": 0})
    rec.add("/big", "std_msgs/msg/String", 1, b"\0" * (2 << 20))  # more than the whole 1 MiB bound: dropped
    rec.add("/joint_states", "sensor_msgs/msg/JointState", 2, joint_state_cdr(2))
    rec.close()
    assert done.wait(30)
    assert (reports[0]["messages"], reports[0]["dropped"], reports[0]["error"]) == (1, 1, None)
    assert any("1 messages dropped" in line for line in logs)


@pytest.mark.parametrize("args, contains", [
    (["{tmp}/missing", "--out", "{tmp}/out"], "does not exist"),
    (["{tmp}/not_a_bag", "--out", "{tmp}/out"], "no metadata.yaml"),
    (["{tmp}/broken_bag", "--out", "{tmp}/out"], "cannot read bag"),
    (["{tmp}/user_bag", "--out", "{tmp}/out"], "give --topic-map"),
    (["{tmp}/user_bag", "--out", "{tmp}/out", "--topic-map", "{tmp}/missing.yaml"], "missing.yaml"),
    (["{tmp}/user_bag", "--out", "{tmp}/out", "--topic-map", "{tmp}/map_unknown_key.yaml"], "unknown key"),
    (["{tmp}/user_bag", "--out", "{tmp}/out", "--topic-map", "{tmp}/map_wrong_topic.yaml"], "/nope"),
    (["{tmp}/user_bag", "--out", "{tmp}/out", "--topic-map", "{tmp}/map_wrong_joint.yaml"], "j9"),
    (["{tmp}/user_bag", "--out", "{tmp}/taken", "--topic-map", "{tmp}/map.yaml"], "not empty"),
    (["{tmp}/user_bag", "--out", "{tmp}/user_bag", "--topic-map", "{tmp}/map.yaml"], "input"),
])
def test_import_rosbag_bad_inputs_are_one_line_and_change_nothing(tmp_path, args, contains):
    write_user_bag(tmp_path / "user_bag", seconds=0.3)
    (tmp_path / "not_a_bag").mkdir()
    (tmp_path / "broken_bag").mkdir()
    (tmp_path / "broken_bag" / "metadata.yaml").write_text("rosbag2_bagfile_information: {version: 9}\n")
    (tmp_path / "map.yaml").write_text(MAP)
    (tmp_path / "map_unknown_key.yaml").write_text(MAP + "fps: 10\n")
    (tmp_path / "map_wrong_topic.yaml").write_text(MAP.replace("/cam/image", "/nope"))
    (tmp_path / "map_wrong_joint.yaml").write_text(MAP.replace("[j1, j2, j3]}\naction", "[j9]}\naction"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert_refused_unchanged("sim-trainer", ["dataset", "import-rosbag", *(a.format(tmp=tmp_path) for a in args)],
                             watched=[tmp_path], contains=contains)
    assert not (tmp_path / "out").exists()
