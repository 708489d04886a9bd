"""Each node's behaviour over real DDS: nodes under test in this process, a probe node on its own participant."""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import replace

import cv2
import numpy as np
import pytest
import yaml
from rclpy.parameter import Parameter
from sensor_msgs.msg import CameraInfo, Image, JointState
from std_msgs.msg import Bool, Float64MultiArray, String
from std_srvs.srv import Trigger
from vla_ros import topics
from vla_ros.actions import PANDA_ARM, PANDA_FINGERS
from vla_ros.ros_util import rgb_to_image
from vla_ros.stack import SHARED

from policy_runtime.protocol import Contract
from tests.ros_fixtures import CONFIG, Probe, nodes_under_test, wait_for

REST = [0.0, 0.39, 0.0, -1.96, 0.0, 2.36, 0.79, 0.04, 0.04]
NAMES = list(PANDA_ARM + PANDA_FINGERS)
PROBE = "/test_probe"  # the probe plays the eval manager (the control authority) where a test says so
# The hello contract a policy node announces on /vla/policy/spec (a state-only PushCube policy).
CONTRACT = Contract(
    model_sha256="0" * 64, backend="test", provider="none", horizon=8, exec_steps=4, action_dim=8, num_steps=2,
    control_mode="pd_joint_delta_pos", action_low=(-1.0,) * 8, action_high=(1.0,) * 8, clip_actions=True, cameras=(),
    state_dim=9, state_layout=(("agent/qpos", 9),), normalisation_sha256="0" * 64, control_hz=20.0,
    text_max_len=16, default_instruction="push", task="PushCube-v1", action_joints=(*PANDA_ARM, "gripper"),
    obs_mode="state")
# Watchdog limits for tests that are not about those watchdogs: a busy host delays joint states and heartbeats by
# far more than a control period, and a stale-state hold would then stand in for the behaviour under test.
# The same for the control authority: a new publisher may take seconds to appear in the ROS graph.
RELAXED = {"stale_state_s": 5.0, "authority_grace_s": 30.0}


@pytest.fixture
def ros():
    yield from nodes_under_test()


def params(**kw) -> list[Parameter]:
    return [Parameter(k, value=v) for k, v in kw.items()]


def joint_state(probe: Probe, positions=REST) -> JointState:
    msg = JointState(name=NAMES, position=[float(x) for x in positions], velocity=[0.0] * len(NAMES))
    msg.header.stamp = probe.node.get_clock().now().to_msg()
    return msg


def start_joint_states(probe: Probe, positions=REST):
    pub = probe.node.create_publisher(JointState, topics.JOINT_STATES, 10)
    return probe.node.create_timer(0.02, lambda: pub.publish(joint_state(probe, positions)))


def publish_spec(probe: Probe, **changes) -> None:
    """The policy node's contract announcement (latched), as the safety filter receives it."""
    pub = probe.node.create_publisher(String, topics.POLICY_SPEC, topics.LATCHED_QOS)
    pub.publish(String(data=json.dumps(replace(CONTRACT, **changes).to_wire())))


def diag_values(probe: Probe, name: str) -> dict:
    for msg in reversed(probe.received.get(topics.DIAGNOSTICS, [])):
        for st in msg.status:
            if st.name == f"vla/{name}":
                return {"level": st.level, "message": st.message, **{kv.key: kv.value for kv in st.values}}
    return {}


def test_safety_filter_node_nan_estop_watchdog_forward_command(ros):
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
    from vla_ros.safety_node import SafetyFilterNode

    add, probe = ros
    filt = add(SafetyFilterNode("safety_filter", parameter_overrides=params(
        controller_type="forward_command", controller_topic="/fcc/commands", gripper_topic="/gripper/commands",
        gripper_joint="panda_finger_joint1", late_action_s=0.3, diagnostics_hz=10.0, control_authority=PROBE,
        source_lease_s=0.0, **RELAXED)))  # the source is sent once here; the lease has its own test
    probe.add_node("fcc", joints=list(PANDA_ARM))  # the controller node, with the joint order it was configured for
    publish_spec(probe)
    cmds = probe.collect(Float64MultiArray, "/fcc/commands", topics.COMMAND_QOS)
    grip = probe.collect(Float64MultiArray, "/gripper/commands", topics.COMMAND_QOS)
    probe.collect(DiagnosticArray, topics.DIAGNOSTICS)
    start_joint_states(probe)
    probe.node.create_publisher(String, topics.CONTROL_SOURCE, topics.LATCHED_QOS).publish(String(data="policy"))
    act_pub = probe.node.create_publisher(JointState, topics.POLICY_ACTION, topics.COMMAND_QOS)

    def act(values) -> None:
        act_pub.publish(JointState(name=list(PANDA_ARM) + ["gripper"], position=[float(v) for v in values]))

    wait_for(lambda: diag_values(probe, "safety_filter").get("source") == "policy", 20, "policy in control")
    wait_for(lambda: filt.joints.get() is not None, 20, "joint states at the filter")
    n = len(cmds)
    act([0.5, 0, 0, 0, 0, 0, 0, -0.4])
    wait_for(lambda: len(cmds) > n, 10, "a command on the forward_command topic")
    assert len(cmds[-1].data) == 7 and cmds[-1].data[0] == pytest.approx(0.05, abs=1e-6)
    wait_for(lambda: grip, 10, "a gripper command")
    assert grip[-1].data[0] == pytest.approx(0.04 - 0.2 * 0.95 / 20)  # towards 0.005 m at the fingers' speed limit

    act([np.nan] + [0.0] * 7)
    wait_for(lambda: int(diag_values(probe, "safety_filter").get("count/non_finite", 0)) >= 1, 10, "NaN counted")
    assert all(np.isfinite(m.data).all() for m in cmds) and cmds[-1].data[0] == pytest.approx(0.05, abs=1e-6)

    probe.node.create_publisher(Bool, topics.ESTOP, topics.COMMAND_QOS).publish(Bool(data=True))
    wait_for(lambda: diag_values(probe, "safety_filter").get("estop"), 10, "e-stop latched")
    assert diag_values(probe, "safety_filter")["level"] == DiagnosticStatus.ERROR
    for _ in range(3):
        act([1.0, 0, 0, 0, 0, 0, 0, 0])
    wait_for(lambda: int(diag_values(probe, "safety_filter").get("count/estop_latched", 0)) >= 2, 10,
             "actions refused while latched")
    assert max(m.data[0] for m in cmds) == pytest.approx(0.05, abs=1e-6)  # never moved past the pre-e-stop target
    assert probe.call(Trigger, "/safety_filter/reset_estop").success
    assert probe.call(Trigger, "/safety_filter/rearm").success  # the operator's explicit re-arm
    n = len(cmds)
    act([1.0, 0, 0, 0, 0, 0, 0, 0])
    wait_for(lambda: any(m.data[0] > 0.09 for m in cmds[n:]), 10, "a command after the reset")
    # No more actions: the late-action watchdog holds the arm and says so.
    wait_for(lambda: int(diag_values(probe, "safety_filter").get("count/late_action", 0)) >= 1, 10, "late watchdog")
    # The e-stop service latches too.
    assert probe.call(Trigger, "/safety_filter/estop").success
    wait_for(lambda: diag_values(probe, "safety_filter").get("estop") == "e-stop service", 10, "service e-stop")


def test_safety_filter_dry_run_never_reaches_the_controller(ros):
    from vla_ros.safety_node import SafetyFilterNode

    add, probe = ros
    add(SafetyFilterNode("safety_filter", parameter_overrides=params(dry_run=True, controller_topic="/jtc/traj",
                                                                     source_lease_s=0.0, control_authority=PROBE)))
    from trajectory_msgs.msg import JointTrajectory

    real = probe.collect(JointTrajectory, "/jtc/traj", topics.COMMAND_QOS)
    dry = probe.collect(JointTrajectory, "/safety_filter/dry_run/jtc/traj", topics.COMMAND_QOS)
    start_joint_states(probe)
    probe.node.create_publisher(String, topics.CONTROL_SOURCE, topics.LATCHED_QOS).publish(String(data="teleop"))
    pub = probe.node.create_publisher(JointState, topics.TELEOP_COMMAND, topics.COMMAND_QOS)
    target = list(REST)
    target[0] = 0.02

    def send() -> bool:
        pub.publish(JointState(name=NAMES, position=target))
        return any(m.points and m.points[0].positions[0] == pytest.approx(0.02) for m in dry)

    wait_for(send, 20, "a dry-run trajectory", poll=0.1)
    msg = next(m for m in dry if m.points[0].positions[0] == pytest.approx(0.02))
    assert list(msg.joint_names) == NAMES and len(msg.points[0].velocities) == len(NAMES)
    assert real == []


def test_safety_filter_takes_control_back_when_the_source_lease_lapses(ros):
    from vla_ros.safety_node import SafetyFilterNode

    add, probe = ros
    add(SafetyFilterNode("safety_filter", parameter_overrides=params(
        controller_type="forward_command", controller_topic="/fcc/commands", source_lease_s=2.0,
        late_action_s=5.0, diagnostics_hz=10.0, control_authority=PROBE, **RELAXED)))
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus

    probe.add_node("fcc", joints=NAMES)
    publish_spec(probe)

    cmds = probe.collect(Float64MultiArray, "/fcc/commands", topics.COMMAND_QOS)
    probe.collect(DiagnosticArray, topics.DIAGNOSTICS)
    start_joint_states(probe)
    src = probe.node.create_publisher(String, topics.CONTROL_SOURCE, topics.LATCHED_QOS)
    act_pub = probe.node.create_publisher(JointState, topics.POLICY_ACTION, topics.COMMAND_QOS)
    heartbeat = probe.node.create_timer(0.1, lambda: src.publish(String(data="policy")))  # an eval manager

    def safety() -> dict:
        return diag_values(probe, "safety_filter")

    def act() -> None:
        act_pub.publish(JointState(name=list(PANDA_ARM) + ["gripper"], position=[0.5] + [0.0] * 7))

    wait_for(lambda: safety().get("source") == "policy", 20, "policy in control")
    time.sleep(4.0)  # twice the lease: renewed by the heartbeat (20 per lease, so a busy host still renews it)
    assert safety().get("source") == "policy" and "count/source_lease_lapsed" not in safety()
    n = len(cmds)
    act()
    wait_for(lambda: len(cmds) > n, 10, "a forwarded policy command")

    heartbeat.cancel()  # the eval manager dies
    wait_for(lambda: safety().get("lease_lapsed") == "True", 20, "the lease to lapse")
    assert safety()["source"] == "hold" and safety()["count/source_lease_lapsed"] == "1"
    assert safety()["level"] == DiagnosticStatus.ERROR  # a live eval manager aborts its trial on this
    n = len(cmds)
    src.publish(String(data="policy"))  # a stale or confused publisher cannot hand the arm back to the policy
    for _ in range(5):
        act()
        time.sleep(0.1)
    assert safety()["source"] == "hold" and len(cmds) == n
    src.publish(String(data="teleop"))  # a (restarted) eval manager starts from teleop or hold
    wait_for(lambda: safety().get("source") == "teleop" and safety().get("lease_lapsed") == "False", 10,
             "control back to the operator")


def robot_params(node: str, **overrides) -> list[Parameter]:
    """A node's parameters from launch/config/robot_eval.yaml (the real arm's limits), with test overrides."""
    doc = yaml.safe_load((CONFIG / "robot_eval.yaml").read_text())
    shared = doc.get(SHARED, {}).get("ros__parameters", {})  # as rclpy applies the wildcard section
    return params(**{**shared, **doc[node]["ros__parameters"], **overrides})


def hand_control(probe: Probe, source: str) -> None:
    probe.node.create_publisher(String, topics.CONTROL_SOURCE, topics.LATCHED_QOS).publish(String(data=source))


def assert_within_velocity_limits(trajectories: list, margin: float) -> None:
    """Consecutive commands (one control period apart) and every velocity field stay within the URDF limits.

    A hold (velocity field zero) is exempt from the step check: it stops where the arm is (a change of source).
    """
    from vla_ros.robot import RobotModel

    limits, dt = RobotModel().limits, 1 / 20
    for prev, cur in itertools.pairwise(trajectories):
        if not any(cur.points[0].velocities):
            continue
        for j, p0, p1, v in zip(cur.joint_names, prev.points[0].positions, cur.points[0].positions,
                                cur.points[0].velocities, strict=True):
            vmax = limits[j].velocity * (1 - margin)
            assert abs(p1 - p0) <= vmax * dt + 1e-9 and abs(v) <= vmax + 1e-9, (j, p0, p1, v)


def test_oscillating_policy_through_the_filter_stays_within_the_velocity_limit(ros):
    """+1/-1 every step with the robot's limits; the arm lags (the measured position stays put)."""
    from trajectory_msgs.msg import JointTrajectory
    from vla_ros.safety_node import SafetyFilterNode

    add, probe = ros
    add(SafetyFilterNode("safety_filter", parameter_overrides=robot_params(
        "safety_filter", dry_run=False, source_lease_s=0.0, late_action_s=5.0, control_authority=PROBE, **RELAXED)))
    sent = probe.collect(JointTrajectory, "/joint_trajectory_controller/joint_trajectory", topics.COMMAND_QOS)
    publish_spec(probe)
    start_joint_states(probe)
    hand_control(probe, "policy")
    act_pub = probe.node.create_publisher(JointState, topics.POLICY_ACTION, topics.COMMAND_QOS)
    sign = itertools.cycle([1.0, -1.0])
    probe.node.create_timer(0.05, lambda: act_pub.publish(JointState(name=list(PANDA_ARM) + ["gripper"],
                                                                     position=[next(sign)] * 8)))
    wait_for(lambda: len(sent) >= 30, 60, "30 filtered policy commands")
    with probe.lock:
        trajectories = list(sent)
    moved = [abs(b.points[0].positions[0] - a.points[0].positions[0]) for a, b in itertools.pairwise(trajectories)]
    assert max(moved) > 0.01  # the policy did drive the arm
    assert_within_velocity_limits(trajectories, margin=0.2)


def test_teleop_finger_targets_are_clipped_and_counted(ros):
    from diagnostic_msgs.msg import DiagnosticArray
    from trajectory_msgs.msg import JointTrajectory
    from vla_ros.safety_node import SafetyFilterNode

    add, probe = ros
    add(SafetyFilterNode("safety_filter", parameter_overrides=robot_params(
        "safety_filter", dry_run=False, source_lease_s=0.0, diagnostics_hz=10.0, control_authority=PROBE,
        **RELAXED)))
    sent = probe.collect(JointTrajectory, "/joint_trajectory_controller/joint_trajectory", topics.COMMAND_QOS)
    probe.collect(DiagnosticArray, topics.DIAGNOSTICS)
    start_joint_states(probe)
    hand_control(probe, "teleop")
    pub = probe.node.create_publisher(JointState, topics.TELEOP_COMMAND, topics.COMMAND_QOS)
    wild = itertools.cycle([1000.0, -1000.0])
    probe.node.create_timer(0.05, lambda: pub.publish(JointState(name=NAMES, position=REST[:7] + [next(wild)] * 2)))

    def limited() -> int:
        return int(diag_values(probe, "safety_filter").get("count/position_limited", 0))

    wait_for(lambda: limited() >= 10 and len(sent) >= 10, 60, "finger targets clipped and counted")
    with probe.lock:
        trajectories = list(sent)
    fingers = [p for m in trajectories for j, p in zip(m.joint_names, m.points[0].positions, strict=True)
               if "finger" in j]
    assert min(fingers) >= 0.0 and max(fingers) <= 0.04
    assert_within_velocity_limits(trajectories, margin=0.2)


def test_homing_with_the_robot_configuration_reaches_home(ros, tmp_path):
    """The eval manager's home pose (arm joints of robot_eval.yaml) through the filter with the robot's limits,
    on an arm that follows its commands: every command is accepted and the arm gets home."""
    from trajectory_msgs.msg import JointTrajectory
    from vla_ros.eval_manager_node import EvalManagerNode
    from vla_ros.safety_node import SafetyFilterNode

    add, probe = ros
    arm = dict(zip(NAMES, [0.5, 0.2, 0.0, -2.3, 0.0, 2.6, 0.3, 0.04, 0.04], strict=True))
    sent: list = []

    def follow(msg: JointTrajectory) -> None:
        with probe.lock:
            sent.append(msg)
            arm.update(zip(msg.joint_names, msg.points[0].positions, strict=True))

    probe.node.create_subscription(JointTrajectory, "/joint_trajectory_controller/joint_trajectory", follow,
                                   topics.COMMAND_QOS)
    js = probe.node.create_publisher(JointState, topics.JOINT_STATES, 10)

    def publish_arm() -> None:
        with probe.lock:
            msg = joint_state(probe, [arm[j] for j in NAMES])
        js.publish(msg)

    probe.node.create_timer(0.02, publish_arm)
    filt = add(SafetyFilterNode("safety_filter", parameter_overrides=robot_params(
        "safety_filter", dry_run=False, source_lease_s=0.0, **RELAXED)))
    plan = tmp_path / "plan.yaml"
    plan.write_text("instruction: push\ncount: 1\nseed_start: 0\n")
    manager = add(EvalManagerNode("eval_manager", parameter_overrides=robot_params(
        "eval_manager", plan=str(plan), results_dir=str(tmp_path / "out"), console=False, home_timeout_s=120.0)))
    doc = yaml.safe_load((CONFIG / "robot_eval.yaml").read_text())["eval_manager"]["ros__parameters"]
    home = dict(zip(doc["home_joints"], doc["home_positions"], strict=True))

    wait_for(lambda: not manager.homing, 60, "the eval manager to end homing")
    with probe.lock:
        assert all(abs(arm[j] - q) <= 0.02 for j, q in home.items()), arm  # home_tolerance; not a timeout
    refused = {"missing_joint", "unknown_joint", "workspace", "non_finite"} & set(filt.filter.counts)
    assert not refused, dict(filt.filter.counts)
    with probe.lock:
        trajectories = list(sent)
    assert arm["panda_finger_joint1"] == 0.04  # the fingers keep their command
    assert_within_velocity_limits(trajectories, margin=0.2)


def test_camera_node_publishes_video_frames_and_camera_info(ros, tmp_path):
    from vla_ros.camera_node import CameraNode
    from vla_ros.params import ParamError

    add, probe = ros
    video = tmp_path / "scene.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 24))
    for i in range(5):
        writer.write(np.full((24, 32, 3), (0, 0, 40 * i), np.uint8))  # BGR: red rises
    writer.release()
    cal = tmp_path / "cam.yaml"
    cal.write_text("image_width: 32\nimage_height: 24\ncamera_name: test\n"
                   "camera_matrix: {rows: 3, cols: 3, data: [30, 0, 16, 0, 30, 12, 0, 0, 1]}\n"
                   "distortion_model: plumb_bob\ndistortion_coefficients: {rows: 1, cols: 5, data: [0, 0, 0, 0, 0]}\n")
    images = probe.collect(Image, "/test_cam/color/image_raw", topics.SENSOR_QOS)
    infos = probe.collect(CameraInfo, "/test_cam/color/camera_info", topics.SENSOR_QOS)
    add(CameraNode("camera", parameter_overrides=params(device=str(video), calibration=str(cal),
                                                         image_topic="/test_cam/color/image_raw", loop=True, fps=20.0)))
    wait_for(lambda: images and infos, 20, "camera frames")
    img, info = images[-1], infos[-1]
    assert (img.encoding, img.width, img.height) == ("rgb8", 32, 24)
    rgb = np.frombuffer(bytes(img.data), np.uint8).reshape(24, 32, 3)
    assert rgb[..., 0].mean() >= rgb[..., 2].mean()  # BGR from OpenCV became RGB
    assert list(info.k)[:3] == [30.0, 0.0, 16.0]
    with pytest.raises(ParamError, match="cannot open"):
        CameraNode("camera_bad", parameter_overrides=params(device=str(tmp_path / "missing.avi")))


def test_calibration_capture_writes_samples_json(ros, tmp_path):
    from vla_ros.capture_node import CaptureNode

    add, probe = ros
    out = tmp_path / "capture"
    board = tmp_path / "board.yaml"
    board.write_text("type: charuco\nsquares: [5, 7]\nsquare_length: 0.04\n")
    add(CaptureNode("calibration_capture", parameter_overrides=params(out_dir=str(out), board=str(board),
                                                                      max_skew_s=0.5)))
    img_pub = probe.node.create_publisher(Image, "/camera/camera/color/image_raw", topics.SENSOR_QOS)
    js_pub = probe.node.create_publisher(JointState, topics.JOINT_STATES, 10)

    def publish() -> None:
        js = joint_state(probe)
        img_pub.publish(rgb_to_image(np.full((8, 8, 3), 200, np.uint8), js.header.stamp, "cam"))
        js_pub.publish(js)

    probe.node.create_timer(0.05, publish)
    for _ in range(2):
        wait_for(lambda: probe.call(Trigger, "/calibration_capture/capture").success, 20, "a capture")
    doc = json.loads((out / "samples.json").read_text())
    assert set(doc) == {"board", "intrinsics", "samples"} and doc["intrinsics"] == "camera.yaml"
    assert doc["board"]["type"] == "charuco" and [s["image"] for s in doc["samples"]] == ["img_000.png", "img_001.png"]
    s = doc["samples"][0]
    assert set(s) == {"image", "joint_positions", "stamp"} and list(s["joint_positions"]) == list(PANDA_ARM)
    assert s["joint_positions"]["panda_joint2"] == pytest.approx(0.39)
    assert cv2.imread(str(out / "img_001.png")).shape == (8, 8, 3)


def test_teleop_jogs_only_while_it_has_control(ros):
    from vla_ros.teleop_node import TeleopNode

    add, probe = ros
    node = add(TeleopNode("teleop", parameter_overrides=params(console=False, joint_step=0.03)))
    cmds = probe.collect(JointState, topics.TELEOP_COMMAND, topics.COMMAND_QOS)
    start_joint_states(probe)
    src = probe.node.create_publisher(String, topics.CONTROL_SOURCE, topics.LATCHED_QOS)
    src.publish(String(data="policy"))
    wait_for(lambda: node.joints.get() is not None, 20, "joint states at the teleop node")
    node.key("+")
    src.publish(String(data="teleop"))
    wait_for(lambda: node.active, 10, "teleop in control")
    assert cmds == []  # the key pressed while the policy had control did nothing
    node.key("2")  # selects joint 2 and sends the target unchanged
    node.key("+")
    wait_for(lambda: len(cmds) >= 2, 30, "the jog command")  # both keys' commands, in order
    got = dict(zip(cmds[1].name, cmds[1].position, strict=True))
    assert got["panda_joint2"] == pytest.approx(0.39 + 0.03) and got["panda_joint1"] == pytest.approx(0.0)
    node.key("z")
    wait_for(lambda: len(cmds) >= 3, 30, "a Cartesian jog")


def test_eval_manager_services_journal_and_redo(ros, tmp_path):
    from vla_ros.eval_manager_node import EvalManagerNode

    add, probe = ros
    plan = tmp_path / "plan.yaml"
    plan.write_text("instruction: push\ncount: 2\nseed_start: 40\n")
    states = probe.collect(String, topics.EVAL_STATE, topics.LATCHED_QOS)
    sources = probe.collect(String, topics.CONTROL_SOURCE, topics.LATCHED_QOS)
    trials = probe.collect(String, topics.EVAL_TRIAL, topics.LATCHED_QOS)
    add(EvalManagerNode("eval_manager", parameter_overrides=params(
        plan=str(plan), results_dir=str(tmp_path / "out"), console=False, trial_timeout_s=60.0, ready_s=0.1)))

    def state() -> str:
        return json.loads(states[-1].data)["state"] if states else ""

    wait_for(lambda: state() == "RESET", 20, "RESET")
    wait_for(lambda: trials, 10, "the trial announcement")  # its own topic: it may arrive after the state
    assert json.loads(trials[-1].data) == {"index": 0, "seed": 40, "instruction": "push"}
    assert not probe.call(Trigger, "/eval_manager/success").success  # nothing to judge yet
    assert probe.call(Trigger, "/eval_manager/start").success
    wait_for(lambda: state() == "RUNNING", 20, "RUNNING")
    assert probe.call(Trigger, "/eval_manager/success").success
    wait_for(lambda: state() == "RESET" and json.loads(states[-1].data)["plan_index"] == 1, 20, "next trial")
    assert probe.call(Trigger, "/eval_manager/redo").success
    assert probe.call(Trigger, "/eval_manager/quit").success
    wait_for(lambda: state() == "DONE", 20, "DONE")
    events = [json.loads(line) for line in (tmp_path / "out" / "journal.jsonl").read_text().splitlines()]
    bags = [e for e in events if e["event"] == "bag"]  # written when the bag is closed: after the end, any time
    events = [e for e in events if e["event"] != "bag"]
    assert [(e["event"], e.get("outcome")) for e in events] == [("start", None), ("end", "success"), ("redo", None)]
    assert events[1]["episode"] is None  # no policy ran, so there was nothing to record
    assert [(b["trial"], b["bag"], b["error"]) for b in bags] == [(0, "bags/trial_0000", None)]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["judged"] == 0
    sent = [m.data for m in sources]
    seen = [k for k, _ in itertools.groupby(sent)]  # the source is re-sent as a heartbeat (the safety lease)
    assert len(sent) > len(seen)
    i = seen.index("policy")  # teleop for the reset, hold while READY, policy, hold to judge; hold when done
    assert "teleop" in seen[:i] and seen[i - 1] == "hold" and seen[i + 1] == "hold" and seen[-1] == "hold"


# ----- control authority, re-arming, contracts (issue 12: items 3, 4, 5) ------------------------------------------
def _holds_joint1_at_rest(cmd) -> bool:
    """Does this trajectory command keep joint 1 at rest (as every hold does, and no test policy action does)?"""
    return abs(cmd.points[0].positions[0] - REST[0]) <= 1e-6


def _filter_rig(ros, **overrides):
    """A safety filter on a trajectory topic, joint states at rest, a policy contract; returns helpers."""
    from diagnostic_msgs.msg import DiagnosticArray
    from trajectory_msgs.msg import JointTrajectory
    from vla_ros.safety_node import SafetyFilterNode

    add, probe = ros
    cfg = dict(controller_topic="/jtc/traj", late_action_s=5.0, diagnostics_hz=10.0, source_lease_s=0.0, **RELAXED)
    add(SafetyFilterNode("safety_filter", parameter_overrides=params(**{**cfg, **overrides})))
    cmds = probe.collect(JointTrajectory, "/jtc/traj", topics.COMMAND_QOS)
    probe.collect(DiagnosticArray, topics.DIAGNOSTICS)
    start_joint_states(probe)
    act_pub = probe.node.create_publisher(JointState, topics.POLICY_ACTION, topics.COMMAND_QOS)

    def act(j1: float = 0.5) -> None:
        act_pub.publish(JointState(name=list(PANDA_ARM) + ["gripper"], position=[j1] + [0.0] * 7))

    def moved() -> bool:
        """Did any command move joint 1 away from rest (where every hold keeps it)?"""
        return not all(_holds_joint1_at_rest(m) for m in list(cmds))

    def safety() -> dict:
        return diag_values(probe, "safety_filter")

    return probe, cmds, act, moved, safety


def _keep_acting(act, seconds: float = 1.0) -> None:
    for _ in range(int(seconds / 0.1)):
        act()
        time.sleep(0.1)


def test_only_the_control_authority_may_change_the_control_source(ros):
    from diagnostic_msgs.msg import DiagnosticStatus

    probe, cmds, act, moved, safety = _filter_rig(ros)  # authority: the default /eval_manager
    publish_spec(probe)
    manager = probe.add_node("eval_manager").create_publisher(String, topics.CONTROL_SOURCE, topics.LATCHED_QOS)
    intruder = probe.add_node("intruder").create_publisher(String, topics.CONTROL_SOURCE, topics.LATCHED_QOS)
    wait_for(lambda: safety().get("contract", "ok") == "ok", 20, "the policy contract")

    # An unrelated node hands the arm to the policy while no eval manager has said anything: refused, held.
    intruder.publish(String(data="policy"))
    _keep_acting(act, 1.5)
    assert not moved()
    wait_for(lambda: "/intruder" in safety().get("unauthorised", ""), 60, "the unauthorised source reported")
    assert safety()["level"] == DiagnosticStatus.ERROR and safety()["source"] == "hold"
    assert "'policy' from /intruder" in safety()["message"] and int(safety()["count/unauthorised_source"]) >= 1

    # The eval manager's own messages count: teleop clears the alarm, then the policy drives.
    manager.publish(String(data="teleop"))
    wait_for(lambda: safety().get("source") == "teleop" and safety().get("unauthorised") == "", 20, "teleop")
    manager.publish(String(data="policy"))
    wait_for(lambda: safety().get("source") == "policy", 20, "the policy in control")
    wait_for(lambda: (act(), moved())[1], 20, "a policy command forwarded", poll=0.1)

    # A running trial: an unrelated node switches to teleop. The arm holds, and the eval manager's next
    # `policy` heartbeat does not resume it; only its hold/teleop (the end of the trial) clears the alarm.
    intruder.publish(String(data="teleop"))
    wait_for(lambda: safety().get("source") == "hold" and "'teleop' from /intruder" in safety().get("unauthorised", ""),
             20, "the hijack refused")
    # The hold command travels on its own topic: it may arrive after the diagnostics that report it.
    wait_for(lambda: cmds and not any(cmds[-1].points[0].velocities), 20, "the hold command")
    n = len(cmds)
    manager.publish(String(data="policy"))
    _keep_acting(act)
    assert safety()["source"] == "hold" and safety()["level"] == DiagnosticStatus.ERROR
    assert all(m.points[0].positions == cmds[n - 1].points[0].positions for m in cmds[n:])  # held still
    manager.publish(String(data="hold"))
    wait_for(lambda: safety().get("unauthorised") == "" and safety().get("level") != DiagnosticStatus.ERROR, 20,
             "the alarm cleared by the eval manager")


def test_a_foreign_source_message_amid_a_burst_of_the_authoritys_is_still_judged(ros):
    """The authority re-sends its source as a heartbeat; a foreign message between two beats must not be replaced
    in the filter's queue before it is judged (with a latched 1-deep subscription this test failed every run)."""
    probe, cmds, act, moved, safety = _filter_rig(ros)  # authority: the default /eval_manager
    publish_spec(probe)
    manager = probe.add_node("eval_manager").create_publisher(String, topics.CONTROL_SOURCE, topics.LATCHED_QOS)
    intruder = probe.add_node("intruder").create_publisher(String, topics.CONTROL_SOURCE, topics.LATCHED_QOS)
    wait_for(lambda: manager.get_subscription_count() and intruder.get_subscription_count(), 30, "both matched")
    wait_for(lambda: safety().get("source") == "hold", 30, "the filter's diagnostics")
    for i in range(200):
        manager.publish(String(data="hold"))
        if i == 100:
            intruder.publish(String(data="teleop"))
    # The authority's later "hold" clears the alarm (as designed), so the count is what shows it was judged.
    wait_for(lambda: int(safety().get("count/unauthorised_source", 0)) >= 1, 30, "the intrusion counted")


def test_eval_manager_aborts_a_trial_hijacked_by_another_node(ros, tmp_path):
    from vla_ros.eval_manager_node import EvalManagerNode
    from vla_ros.safety_node import SafetyFilterNode

    add, probe = ros
    plan = tmp_path / "plan.yaml"
    plan.write_text("instruction: push\ncount: 1\nseed_start: 7\n")
    states = probe.collect(String, topics.EVAL_STATE, topics.LATCHED_QOS)
    start_joint_states(probe)
    add(SafetyFilterNode("safety_filter", parameter_overrides=params(  # only the hijack may end the trial
        controller_topic="/jtc/traj", diagnostics_hz=10.0, source_lease_s=0.0, late_action_s=60.0, **RELAXED)))
    add(EvalManagerNode("eval_manager", parameter_overrides=params(
        plan=str(plan), results_dir=str(tmp_path / "out"), console=False, trial_timeout_s=120.0, ready_s=0.1)))

    def state() -> str:
        return json.loads(states[-1].data)["state"] if states else ""

    wait_for(lambda: state() == "RESET", 20, "RESET")
    assert probe.call(Trigger, "/eval_manager/start").success
    wait_for(lambda: state() == "RUNNING", 20, "RUNNING")
    intruder = probe.add_node("intruder").create_publisher(String, topics.CONTROL_SOURCE, topics.LATCHED_QOS)
    intruder.publish(String(data="teleop"))
    journal = tmp_path / "out" / "journal.jsonl"

    def ends() -> list[dict]:
        return [e for e in map(json.loads, journal.read_text().splitlines()) if e["event"] == "end"]

    wait_for(ends, 90, "the trial to end")  # before its 120 s timeout
    (end,) = ends()
    assert end["outcome"] == "aborted" and "unauthorised control source 'teleop' from /intruder" in end["reason"]


def test_estop_reset_holds_until_the_operator_or_the_eval_manager_rearms(ros):
    probe, cmds, act, moved, safety = _filter_rig(ros, control_authority=PROBE)
    publish_spec(probe)
    src = probe.node.create_publisher(String, topics.CONTROL_SOURCE, topics.LATCHED_QOS)
    src.publish(String(data="policy"))
    wait_for(lambda: safety().get("source") == "policy" and safety().get("contract", "ok") == "ok", 20, "policy")
    estop = probe.node.create_publisher(Bool, topics.ESTOP, topics.COMMAND_QOS)

    def estop_and_reset() -> str:
        """Latch and reset the e-stop; leave in `cmds` only what the filter sent after the e-stop's hold."""
        seen = len(cmds)
        estop.publish(Bool(data=True))
        wait_for(lambda: safety().get("estop"), 20, "the e-stop latched")
        reply = probe.call(Trigger, "/safety_filter/reset_estop")
        assert reply.success
        wait_for(lambda: not safety().get("estop"), 20, "the latch cleared")
        # Commands arrive in order: a policy command sent before the e-stop may still be on its way under load, but
        # it is ahead of the e-stop's hold (the first command at rest since `seen`), so drop everything through it.
        held = wait_for(lambda: next((i + 1 for i in range(seen, len(cmds)) if _holds_joint1_at_rest(cmds[i])), None),
                        20, "the e-stop's hold command")
        del cmds[:held]
        return reply.message

    message = estop_and_reset()
    src.publish(String(data="policy"))  # the heartbeat of a running trial does not re-arm
    _keep_acting(act, 1.5)
    assert not moved() and safety()["source"] == "hold" and safety()["armed"] == "False"
    assert "re-armed" in message and "re-armed" in safety()["message"]
    assert probe.call(Trigger, "/safety_filter/rearm").success  # the operator re-arms: the policy drives again
    wait_for(lambda: (act(), moved())[1], 20, "a policy command after the operator's re-arm", poll=0.1)

    estop_and_reset()
    for _ in range(5):  # the eval manager's RESET -> READY step re-arms: teleop heartbeats, then hold...
        src.publish(String(data="teleop"))
        time.sleep(0.1)
    assert safety()["armed"] == "False" and not moved()
    src.publish(String(data="hold"))
    wait_for(lambda: safety().get("armed") == "True", 20, "re-armed by teleop -> hold")
    assert not moved()
    src.publish(String(data="policy"))  # ...and the trial that follows runs
    wait_for(lambda: (act(), moved())[1], 20, "a policy command in the next trial", poll=0.1)


def test_safety_filter_refuses_a_forward_command_controller_with_another_joint_order(ros):
    from vla_ros.safety_node import SafetyFilterNode

    add, probe = ros
    probe.add_node("fcc", joints=NAMES)  # the controller drives joint 1 first
    add(SafetyFilterNode("safety_filter", parameter_overrides=params(
        controller_type="forward_command", controller_topic="/fcc/commands", controller_joints=NAMES[::-1],
        control_authority=PROBE, diagnostics_hz=10.0, source_lease_s=0.0)))
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus

    cmds = probe.collect(Float64MultiArray, "/fcc/commands", topics.COMMAND_QOS)
    probe.collect(DiagnosticArray, topics.DIAGNOSTICS)
    start_joint_states(probe)
    publish_spec(probe)
    probe.node.create_publisher(String, topics.CONTROL_SOURCE, topics.LATCHED_QOS).publish(String(data="policy"))
    act_pub = probe.node.create_publisher(JointState, topics.POLICY_ACTION, topics.COMMAND_QOS)
    wait_for(lambda: diag_values(probe, "safety_filter"), 20, "the safety filter")
    for _ in range(15):
        act_pub.publish(JointState(name=list(PANDA_ARM) + ["gripper"], position=[0.5] + [0.0] * 7))
        time.sleep(0.1)
    assert cmds == []  # not even a hold: in the wrong order it would drive panda_joint7 to joint 1's position
    wait_for(lambda: "do not match" in diag_values(probe, "safety_filter").get("controller", ""), 20,
             "the joint order refused")
    d = diag_values(probe, "safety_filter")
    assert d["level"] == DiagnosticStatus.ERROR and str(NAMES[::-1]) in d["message"] and str(NAMES) in d["message"]


def test_safety_filter_refuses_a_policy_contract_it_does_not_execute(ros):
    from diagnostic_msgs.msg import DiagnosticStatus

    probe, cmds, act, moved, safety = _filter_rig(ros, control_authority=PROBE)
    probe.node.create_publisher(String, topics.CONTROL_SOURCE, topics.LATCHED_QOS).publish(String(data="policy"))
    wait_for(lambda: safety().get("source") == "policy", 20, "policy")
    wait_for(lambda: (act(), int(safety().get("count/no_policy_contract", 0)) >= 1)[1], 20, "actions refused",
             poll=0.1)
    assert not moved()  # no contract yet: no motion

    reversed_joints = list(PANDA_ARM[::-1]) + ["gripper"]
    for changes, words in (({"control_mode": "pd_joint_pos"}, ["'pd_joint_pos'", "'pd_joint_delta_pos'"]),
                           ({"action_joints": reversed_joints},
                            [str(reversed_joints), str(list(PANDA_ARM) + ["gripper"])])):
        publish_spec(probe, **changes)
        wait_for(lambda w=words: all(x in safety().get("message", "") for x in w), 20, f"refusal naming {words}")
        assert safety()["level"] == DiagnosticStatus.ERROR
        _keep_acting(act, 0.5)
        assert not moved()
    publish_spec(probe)
    wait_for(lambda: safety().get("contract") == "ok", 20, "the matching contract accepted")
    wait_for(lambda: (act(), moved())[1], 20, "a policy command under the agreed contract", poll=0.1)


def test_safety_filter_refuses_a_policy_contract_at_another_control_rate(ros):
    from diagnostic_msgs.msg import DiagnosticStatus

    probe, cmds, act, moved, safety = _filter_rig(ros, control_authority=PROBE)  # the filter: control_hz 20
    probe.node.create_publisher(String, topics.CONTROL_SOURCE, topics.LATCHED_QOS).publish(String(data="policy"))
    publish_spec(probe, control_hz=10.0)  # a policy trained at 10 Hz: each action would be half as long
    wait_for(lambda: "control_hz 10 does not match the robot's control_hz 20" in safety().get("message", ""), 20,
             "the rate mismatch refused, naming both rates")
    assert safety()["level"] == DiagnosticStatus.ERROR
    _keep_acting(act, 0.5)
    assert not moved() and int(safety().get("count/policy_contract", 0)) >= 1
    publish_spec(probe)
    wait_for(lambda: safety().get("contract") == "ok", 20, "the contract at the robot's rate accepted")
    wait_for(lambda: (act(), moved())[1], 20, "a policy command under the agreed contract", poll=0.1)


def test_safety_filter_executes_the_contracts_bounds_and_scaling(ros):
    """Not +-1 and +-0.1 rad of the filter's own: the contract's action bounds clip, its arm_delta scales."""
    probe, cmds, act, moved, safety = _filter_rig(ros, control_authority=PROBE)
    probe.node.create_publisher(String, topics.CONTROL_SOURCE, topics.LATCHED_QOS).publish(String(data="policy"))
    publish_spec(probe, action_low=(-0.5,) * 8, action_high=(0.5,) * 8, arm_delta=(-0.05, 0.05))
    wait_for(lambda: safety().get("contract") == "ok", 20, "the contract accepted")
    wait_for(lambda: (act(1.0), moved())[1], 20, "a policy command", poll=0.1)
    step = next(m.points[0].positions[0] for m in list(cmds) if abs(m.points[0].positions[0] - REST[0]) > 1e-6)
    assert step - REST[0] == pytest.approx(-0.05 + 0.5 * 0.1 * (0.5 + 1.0))  # 1.0 clipped to 0.5, then scaled
    # the counter reaches /diagnostics on the filter's next report, which may come after the command
    wait_for(lambda: int(safety().get("count/action_clipped", 0)) >= 1, 20, "the clip counted on /diagnostics")


def test_eval_manager_starts_no_trial_under_a_contract_at_another_control_rate(ros, tmp_path):
    from vla_ros.eval_manager_node import EvalManagerNode

    add, probe = ros
    plan = tmp_path / "plan.yaml"
    plan.write_text("instruction: push\ncount: 1\nseed_start: 3\n")
    states = probe.collect(String, topics.EVAL_STATE, topics.LATCHED_QOS)
    publish_spec(probe, control_hz=10.0)
    manager = add(EvalManagerNode("eval_manager", parameter_overrides=params(
        plan=str(plan), results_dir=str(tmp_path / "out"), console=False, ready_s=0.1, control_hz=20.0)))

    def state() -> str:
        return json.loads(states[-1].data)["state"] if states else ""

    wait_for(lambda: manager.contract_problem, 20, "the contract at 10 Hz seen")
    assert "control_hz 10" in manager.contract_problem and "control_hz 20" in manager.contract_problem
    wait_for(lambda: state() == "RESET", 20, "RESET")
    assert probe.call(Trigger, "/eval_manager/start").success
    wait_for(lambda: state() == "READY", 20, "READY")
    time.sleep(1.0)  # ten times ready_s: with an agreed contract it would be RUNNING by now
    assert state() == "READY"
    publish_spec(probe)
    wait_for(lambda: state() == "RUNNING", 20, "RUNNING once the contract agrees")


def test_teleop_joystick_jogs_at_the_contracts_control_rate(ros):
    from sensor_msgs.msg import Joy
    from vla_ros.teleop_node import TeleopNode

    add, probe = ros
    node = add(TeleopNode("teleop", parameter_overrides=params(console=False, joy_scale=0.5)))
    cmds = probe.collect(JointState, topics.TELEOP_COMMAND, topics.COMMAND_QOS)
    start_joint_states(probe)
    probe.node.create_publisher(String, topics.CONTROL_SOURCE, topics.LATCHED_QOS).publish(String(data="teleop"))
    joy = probe.node.create_publisher(Joy, "/joy", 10)
    probe.node.create_timer(0.05, lambda: joy.publish(Joy(axes=[1.0] + [0.0] * 6, buttons=[0])))
    wait_for(lambda: node.active and node.joy_axes, 20, "teleop in control with a deflected stick")
    time.sleep(0.5)
    assert cmds == [] and node.control_hz is None  # no contract, no rate: the stick waits
    publish_spec(probe, control_hz=10.0)
    wait_for(lambda: len(cmds) >= 2, 20, "joystick jogs")
    first, second = (dict(zip(m.name, m.position, strict=True)) for m in cmds[:2])
    assert node.control_hz == 10.0
    assert second["panda_joint1"] - first["panda_joint1"] == pytest.approx(0.5 / 10.0)  # joy_scale rad/s per tick


def test_a_message_from_an_unknown_publisher_does_not_stall_the_authoritys_heartbeats(ros):
    """A control-source message whose publisher the graph does not show (still being discovered, or already gone)
    waits out its grace without holding up the eval manager's heartbeats; then it is refused as unidentified."""
    from diagnostic_msgs.msg import DiagnosticArray
    from vla_ros.safety_node import SafetyFilterNode

    add, probe = ros
    node = add(SafetyFilterNode("safety_filter", parameter_overrides=params(
        controller_type="forward_command", controller_topic="/fcc/commands", source_lease_s=2.0,
        late_action_s=5.0, diagnostics_hz=10.0, control_authority=PROBE, stale_state_s=5.0, authority_grace_s=6.0)))
    probe.add_node("fcc", joints=NAMES)
    publish_spec(probe)
    probe.collect(DiagnosticArray, topics.DIAGNOSTICS)
    start_joint_states(probe)
    src = probe.node.create_publisher(String, topics.CONTROL_SOURCE, topics.LATCHED_QOS)
    probe.node.create_timer(0.1, lambda: src.publish(String(data="policy")))  # the eval manager's heartbeat

    def safety() -> dict:
        return diag_values(probe, "safety_filter")

    wait_for(lambda: safety().get("source") == "policy" and safety().get("level") == b"\x00", 30, "policy in control")
    # A message whose sender the graph cannot name, delivered through the node's own callback on the node's own
    # executor (as DDS would: never concurrently with its other callbacks). A queue that waited for the sender to
    # be identified would stall the heartbeats for the whole 6 s grace, three times the 2 s lease.
    def deliver() -> None:
        once.cancel()
        node._on_source(String(data="teleop"), {"publisher_gid": {"data": b"\x07" * 16}})

    once = node.create_timer(0.01, deliver)
    wait_for(lambda: "unidentified" in safety().get("message", ""), 30, "the unidentified message refused")
    values = safety()
    assert "count/source_lease_lapsed" not in values, values  # the heartbeats kept the lease alive meanwhile
    assert values["source"] == "hold" and "unidentified" in values["message"], values


def test_safety_filter_sends_a_whole_chunk_as_one_timed_trajectory_and_a_hold_replaces_it(ros):
    """send_whole_chunk: one JointTrajectory per chunk, a point per control step, every point within the per-step
    limits; a NaN point ends the trajectory before it; an e-stop replaces the running trajectory by a hold at the
    point the arm has reached on it (not at its end)."""
    from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint
    from vla_ros.robot import RobotModel

    probe, cmds, act, moved, safety = _filter_rig(ros, control_authority=PROBE, send_whole_chunk=True,
                                                  late_action_s=2.0)
    publish_spec(probe)
    hand_control(probe, "policy")
    wait_for(lambda: safety().get("source") == "policy" and safety().get("contract") == "ok", 30, "policy in control")
    chunk_pub = probe.node.create_publisher(JointTrajectory, topics.POLICY_CHUNK, topics.COMMAND_QOS)

    def send_chunk(rows) -> JointTrajectory:
        """Publish a chunk; returns the trajectory the filter sent for it."""
        n = len(cmds)
        chunk_pub.publish(JointTrajectory(joint_names=list(PANDA_ARM) + ["gripper"], points=[
            JointTrajectoryPoint(positions=[float(x) for x in r]) for r in rows]))
        return wait_for(lambda: next((m for m in list(cmds)[n:] if len(m.points) > 1), None), 30, "a trajectory")

    _keep_acting(act, 3.0)  # steps' actions without chunks for late_action_s (no publish_chunks): held, reported
    assert not moved()
    wait_for(lambda: int(safety().get("count/no_chunk", 0)) >= 1, 30, "the missing chunks reported")
    traj = send_chunk([[1.0] + [0.0] * 7] * 8)  # joint 1 at the policy's largest step, +0.1 rad per step
    times = [p.time_from_start.sec + 1e-9 * p.time_from_start.nanosec for p in traj.points]
    np.testing.assert_allclose(times, 0.05 * np.arange(1, 9), atol=1e-9)
    j1 = np.array([p.positions[0] for p in traj.points])
    np.testing.assert_allclose(j1, REST[0] + 0.1 * np.arange(1, 9), atol=1e-9)
    limits = RobotModel().limits
    for a, b in itertools.pairwise(traj.points):
        for j, p0, p1, v in zip(traj.joint_names, a.positions, b.positions, b.velocities, strict=True):
            vmax = limits[j].velocity * 0.95  # the default velocity_margin
            assert abs(p1 - p0) <= vmax * 0.05 + 1e-9 and abs(v) <= vmax + 1e-9, (j, p0, p1, v)
    assert len([m for m in list(cmds) if len(m.points) > 1]) == 1  # one message for the whole chunk

    rows = [[0.5] + [0.0] * 7] * 6
    rows[3] = [float("nan")] * 8
    assert len(send_chunk(rows).points) == 3  # the validated remainder: the points before the NaN
    wait_for(lambda: int(safety().get("count/non_finite", 0)) >= 1, 30, "the NaN point counted")

    traj = send_chunk([[0.05] + [0.0] * 7] * 100)  # 5 s of slow motion
    time.sleep(0.3)
    n = len(cmds)
    probe.node.create_publisher(Bool, topics.ESTOP, topics.COMMAND_QOS).publish(Bool(data=True))
    hold = wait_for(lambda: next(iter(list(cmds)[n:]), None), 30, "the e-stop's hold")
    assert len(hold.points) == 1 and not any(hold.points[0].velocities)
    on_path = [p.positions[0] for p in traj.points]
    assert hold.points[0].positions[0] in on_path and hold.points[0].positions[0] < on_path[-1]


@pytest.fixture(scope="module")
def control_msgs_built(tmp_path_factory):
    """control_msgs' FollowJointTrajectory built from its interface files (CONTROL_MSGS_SRC: control_msgs' folder
    with action/ and msg/) by vla_ros.build_control_msgs, on the path; skipped where neither is at hand."""
    import os
    import sys

    try:
        from control_msgs.action import FollowJointTrajectory  # noqa: F401  (a ROS 2 install has it)
        return
    except ImportError:
        pass
    src = os.environ.get("CONTROL_MSGS_SRC")
    if not src:
        pytest.skip("control_msgs not installed and CONTROL_MSGS_SRC not set")
    from vla_ros.build_control_msgs import build_control_msgs

    out = tmp_path_factory.mktemp("control_msgs")
    build_control_msgs(src, out)
    sys.path.insert(0, str(out))


def test_whole_chunks_and_holds_go_as_follow_joint_trajectory_goals(ros, control_msgs_built):
    """trajectory_action: the chunk's trajectory, then the e-stop's hold, reach a FollowJointTrajectory server as goals
    over DDS; until the server is up the filter reports it and sends nothing."""
    import threading

    from control_msgs.action import FollowJointTrajectory
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
    from rclpy.action import ActionServer
    from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint
    from vla_ros.safety_node import SafetyFilterNode

    add, probe = ros
    name = "/joint_trajectory_controller/follow_joint_trajectory"
    add(SafetyFilterNode("safety_filter", parameter_overrides=params(
        trajectory_action=name, send_whole_chunk=True, control_authority=PROBE, late_action_s=5.0, diagnostics_hz=10.0,
        source_lease_s=0.0, **RELAXED)))
    probe.collect(DiagnosticArray, topics.DIAGNOSTICS)
    start_joint_states(probe)
    publish_spec(probe)
    hand_control(probe, "policy")

    def safety() -> dict:
        return diag_values(probe, "safety_filter")

    wait_for(lambda: "no FollowJointTrajectory action server" in safety().get("message", ""), 30, "the missing server")
    assert safety()["level"] == DiagnosticStatus.ERROR
    goals, lock = [], threading.Lock()

    def execute(handle):
        with lock:
            goals.append(handle.request.trajectory)
        handle.succeed()
        return FollowJointTrajectory.Result(error_code=FollowJointTrajectory.Result.SUCCESSFUL)

    ActionServer(probe.node, FollowJointTrajectory, name, execute)
    wait_for(lambda: safety().get("controller") == "ok" and safety().get("source") == "policy", 30, "the server found")
    chunk = probe.node.create_publisher(JointTrajectory, topics.POLICY_CHUNK, topics.COMMAND_QOS)
    n = len(goals)
    chunk.publish(JointTrajectory(joint_names=list(PANDA_ARM) + ["gripper"], points=[
        JointTrajectoryPoint(positions=[0.5] + [0.0] * 7) for _ in range(6)]))
    goal = wait_for(lambda: next((g for g in goals[n:] if len(g.points) > 1), None), 30, "the chunk's goal")
    assert len(goal.points) == 6 and list(goal.joint_names) == NAMES
    np.testing.assert_allclose([p.positions[0] for p in goal.points], REST[0] + 0.05 * np.arange(1, 7), atol=1e-9)
    n = len(goals)
    probe.node.create_publisher(Bool, topics.ESTOP, topics.COMMAND_QOS).publish(Bool(data=True))
    hold = wait_for(lambda: next(iter(goals[n:]), None), 30, "the hold's goal")
    assert len(hold.points) == 1 and not any(hold.points[0].velocities)
    assert int(safety().get("goals_rejected", -1)) == 0


def test_a_bag_that_cannot_be_written_never_stops_the_trial(ros, tmp_path):
    """results_dir/bags is a file: the trial runs and is judged as always; the journal's `bag` event says why there
    is no bag."""
    from vla_ros.eval_manager_node import EvalManagerNode

    add, probe = ros
    plan = tmp_path / "plan.yaml"
    plan.write_text("instruction: push\ncount: 2\nseed_start: 40\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "bags").write_text("not a directory")
    states = probe.collect(String, topics.EVAL_STATE, topics.LATCHED_QOS)
    add(EvalManagerNode("eval_manager", parameter_overrides=params(
        plan=str(plan), results_dir=str(out), console=False, trial_timeout_s=60.0, ready_s=0.1)))

    def state() -> dict:
        return json.loads(states[-1].data) if states else {}

    wait_for(lambda: state().get("state") == "RESET", 20, "RESET")
    assert probe.call(Trigger, "/eval_manager/start").success
    wait_for(lambda: state().get("state") == "RUNNING", 20, "RUNNING")
    assert probe.call(Trigger, "/eval_manager/success").success
    wait_for(lambda: state().get("state") == "RESET" and state().get("plan_index") == 1, 20, "the next trial")

    def bag_events() -> list[dict]:
        events = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
        return [e for e in events if e["event"] == "bag"]

    (bag,) = wait_for(bag_events, 30, "the bag's report")
    assert bag["trial"] == 0 and bag["messages"] == 0 and "bags" in bag["error"]
    assert [e["outcome"] for e in map(json.loads, (out / "journal.jsonl").read_text().splitlines())
            if e["event"] == "end"] == ["success"]
