"""Sim twin: a ManiSkill task standing in for the arm, its controllers and its cameras.

It publishes what the hardware would (realsense-style image + camera_info, `/joint_states`), obeys the same
controller topic the safety filter writes (joint_trajectory or forward_command), and steps physics at the
control rate in wall-clock time scaled by `real_time_factor`. With `publish_clock` it is the ROS clock
(`/clock`, one control period per physics step), so nodes run with `use_sim_time` stay in lockstep with
physics even when the host cannot keep up with real time. `~/reset` does the scene reset an operator would
do by hand, with the seed of the current trial (`/vla/eval/trial`); `/sim_twin/success` judges trials.
With `lockstep_timeout_s` > 0, while the policy is in control each physics step waits (up to that long) for
the command answering the last observation, as the simulator does during `sim-trainer eval`: this isolates
the stack's correctness from the host's speed (the full-stack vs direct-eval benchmark uses it).

Physics runs under ManiSkill's `pd_joint_pos` controller: the commanded joint targets are absolute, exactly
what the real joint_trajectory_controller receives. A trajectory of several points (the safety filter's
`send_whole_chunk`) is followed on the sim clock, as a joint_trajectory_controller does: each physics step
targets the point due at its end; a new command replaces it. Lockstep does not wait while one runs.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.node import Node
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import CameraInfo, Image, JointState
from std_msgs.msg import Bool, Float64MultiArray, String
from std_srvs.srv import Trigger

from policy_runtime.contract import GRIPPER_RANGE
from vla_ros import topics
from vla_ros.controller_io import ControllerSpec, parse_arm_message, trajectory_points
from vla_ros.params import declare, require, run_node_main
from vla_ros.ros_util import rgb_to_image

DEFAULTS = {
    "task": "PushCube-v1",
    "image_size": 64,
    "camera_sensors": "str[]",          # ManiSkill sensor names; default: all of the task's cameras
    "camera_topics": ["/camera/camera/color/image_raw"],
    "real_time_factor": 1.0,
    "publish_clock": True,
    "controller_type": "joint_trajectory",
    "controller_topic": "/joint_trajectory_controller/joint_trajectory",
    "gripper_topic": "",
    "gripper_joint": "",
    "gripper_low": GRIPPER_RANGE[0],    # the sim gripper controller's finger range (ManiSkill's Panda)
    "gripper_high": GRIPPER_RANGE[1],
    "initial_seed": 0,
    "lockstep_timeout_s": 0.0,
}


def _ns_to_time(ns: int):
    from builtin_interfaces.msg import Time

    return Time(sec=ns // 10**9, nanosec=ns % 10**9)


class SimTwinNode(Node):
    def __init__(self, name: str = "sim_twin", **node_kwargs):
        super().__init__(name, **node_kwargs)
        p = declare(self, DEFAULTS)
        require(p["real_time_factor"] > 0, "real_time_factor must be > 0")
        from sim_trainer.envs.make import make_maniskill_env
        from sim_trainer.envs.spec import EnvConfig

        cfg = EnvConfig(task=p["task"], obs_mode="rgb", image_size=p["image_size"]).validate()
        self.env = make_maniskill_env(cfg, control_mode="pd_joint_pos", max_episode_steps=10**9)
        self.joint_names = [j.name for j in self.env.unwrapped.agent.robot.get_active_joints()]
        self.arm = [j for j in self.joint_names if "finger" not in j]
        self.fingers = [j for j in self.joint_names if "finger" in j]
        self.g_low, self.g_high = p["gripper_low"], p["gripper_high"]
        self.control_hz = float(self.env.unwrapped.control_freq)  # the simulated controller's own rate
        self.period_ns = int(round(1e9 / self.control_hz))
        self.wall_period = 1.0 / (self.control_hz * p["real_time_factor"])
        self.publish_clock = p["publish_clock"]
        self.sim_ns = 0
        self.lock = threading.Lock()
        self.target: dict[str, float] = {}
        self.trajectory: list[tuple[int, dict[str, float]]] = []  # (due at, sim/node clock ns; targets)
        self.trial_seed: int | None = None
        self.reset_request: tuple[int, threading.Event] | None = None
        self.steps = 0
        self.lockstep_s = float(p["lockstep_timeout_s"])
        self.policy_in_control = False
        self.command_arrived = threading.Event()

        raw = self._reset(int(p["initial_seed"]))
        sensors = list(p["camera_sensors"]) or list(raw["sensor_data"])
        require(len(p["camera_topics"]) == len(sensors),
                f"camera_topics has {len(p['camera_topics'])} entries for cameras {sensors}")
        self.cameras = []
        for sensor, topic in zip(sensors, p["camera_topics"], strict=True):
            require(sensor in raw["sensor_data"], f"task {p['task']} has no camera {sensor!r}")
            base = topic.rsplit("/", 1)[0]
            self.cameras.append((sensor, self.create_publisher(Image, topic, topics.SENSOR_QOS),
                                 self.create_publisher(CameraInfo, f"{base}/camera_info", topics.SENSOR_QOS)))
        ctrl = ControllerSpec(p["controller_type"], p["controller_topic"],
                              tuple(self.joint_names if not p["gripper_topic"] else self.arm),
                              p["gripper_topic"], p["gripper_joint"])
        self.ctrl = ctrl
        # Like a ros2_control controller, say which joints the command vector addresses, in order: the safety
        # filter checks its controller_joints against this before it sends a forward_command vector
        # (safety_filter.controller_node: /sim_twin).
        self.declare_parameter("joints", list(ctrl.joints), ParameterDescriptor(read_only=True))
        self.create_subscription(ctrl.message_type, ctrl.topic, self._on_command, topics.COMMAND_QOS)
        if ctrl.gripper_topic:
            self.create_subscription(Float64MultiArray, ctrl.gripper_topic, self._on_gripper, topics.COMMAND_QOS)
        self.create_subscription(String, topics.EVAL_TRIAL, self._on_trial, topics.LATCHED_QOS)
        self.create_subscription(String, topics.CONTROL_SOURCE, self._on_source, topics.LATCHED_QOS)
        self.joint_pub = self.create_publisher(JointState, topics.JOINT_STATES, topics.COMMAND_QOS)
        self.success_pub = self.create_publisher(Bool, topics.SIM_SUCCESS, topics.COMMAND_QOS)
        self.clock_pub = self.create_publisher(Clock, "/clock", 10) if self.publish_clock else None
        self.create_service(Trigger, "~/reset", self._srv_reset)
        self.running = True
        self.last_raw, self.last_success = raw, False
        self.thread = threading.Thread(target=self._loop, name="sim_twin_physics", daemon=True)
        self.thread.start()
        self.get_logger().info(f"sim twin {p['task']}: {len(self.cameras)} camera(s), {self.control_hz:g} Hz x "
                               f"{p['real_time_factor']} real time, joints {self.joint_names}")

    # ----- commands ------------------------------------------------------------------------------------------------
    def _on_command(self, msg) -> None:
        try:
            targets = parse_arm_message(self.ctrl, msg)
            timed = trajectory_points(msg)
        except ValueError as e:
            self.get_logger().error(f"ignored malformed command: {e}")
            return
        unknown = [j for j in targets if j not in self.joint_names]
        if unknown:
            self.get_logger().error(f"ignored command for unknown joints {unknown}")
            return
        with self.lock:
            if timed is None:
                self.trajectory = []
                self.target.update(targets)
            else:
                start = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec or self._now_ns()
                self.trajectory = [(start + int(round(t * 1e9)), point) for t, point in timed]
        self.command_arrived.set()

    def _now_ns(self) -> int:
        return self.sim_ns if self.publish_clock else self.get_clock().now().nanoseconds

    def _follow_trajectory(self) -> bool:
        """Target the running trajectory's point due at the end of this physics step; False when none runs."""
        with self.lock:
            end = self._now_ns() + self.period_ns - self.period_ns // 2  # half a period for clock rounding
            while len(self.trajectory) > 1 and self.trajectory[0][0] < end:
                self.trajectory.pop(0)
            if not self.trajectory:
                return False
            self.target.update(self.trajectory[0][1])
            if self.trajectory[0][0] < end:
                self.trajectory = []  # its last point: held from now on
            return True

    def _on_source(self, msg: String) -> None:
        self.policy_in_control = msg.data == "policy"

    def _on_gripper(self, msg: Float64MultiArray) -> None:
        if len(msg.data) == 1:
            with self.lock:
                self.target.update({j: float(msg.data[0]) for j in self.fingers})

    def _on_trial(self, msg: String) -> None:
        try:
            self.trial_seed = int(json.loads(msg.data)["seed"])
        except (ValueError, KeyError, TypeError):
            self.get_logger().error(f"ignored malformed trial message {msg.data[:80]!r}")

    def _srv_reset(self, _req, resp):
        seed = self.trial_seed if self.trial_seed is not None else self.steps
        done = threading.Event()
        with self.lock:
            self.reset_request = (seed, done)
        resp.success = done.wait(30.0)
        resp.message = f"scene reset with seed {seed}" if resp.success else "reset timed out"
        return resp

    # ----- physics -------------------------------------------------------------------------------------------------
    def _reset(self, seed: int) -> dict:
        raw, _ = self.env.reset(seed=seed)
        q = raw["agent"]["qpos"][0].numpy().astype(float)
        with self.lock:
            self.target = dict(zip(self.joint_names, q, strict=True))
            self.trajectory = []
        return raw

    def _action(self) -> np.ndarray:
        with self.lock:
            t = dict(self.target)
        arm = [t[j] for j in self.arm]
        g = t[self.fingers[0]] if self.fingers else 0.0
        g_norm = np.clip(2.0 * (g - self.g_low) / (self.g_high - self.g_low) - 1.0, -1.0, 1.0)
        return np.asarray(arm + ([g_norm] if self.fingers else []), dtype=np.float32)[None]

    def _loop(self) -> None:
        import torch

        next_t = time.monotonic()
        while self.running:
            with self.lock:
                req, self.reset_request = self.reset_request, None
            if req is not None:
                self.last_raw, self.last_success = self._reset(req[0]), False
                self.get_logger().info(f"scene reset, seed {req[0]}")
                req[1].set()
            else:
                if not self._follow_trajectory() and self.lockstep_s > 0 and self.policy_in_control:
                    self.command_arrived.wait(self.lockstep_s)
                    self._follow_trajectory()  # the command that arrived may be a trajectory
                raw, _r, _term, _trunc, info = self.env.step(torch.as_tensor(self._action()))
                self.last_raw, self.last_success = raw, bool(info["success"][0])
            self.steps += 1
            self.sim_ns += self.period_ns
            self.command_arrived.clear()
            try:
                self._publish(self.last_raw, self.last_success)
            except Exception:  # the node is being destroyed (shutdown): stop stepping
                if self.running and self.context.ok():
                    raise
                return
            next_t += self.wall_period
            delay = next_t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_t = time.monotonic()  # behind real time: do not try to catch up in a burst

    def _publish(self, raw: dict, success: bool) -> None:
        stamp = _ns_to_time(self.sim_ns) if self.publish_clock else self.get_clock().now().to_msg()
        js = JointState()
        js.header.stamp = stamp
        js.name = list(self.joint_names)
        js.position = raw["agent"]["qpos"][0].numpy().astype(float).tolist()
        js.velocity = raw["agent"]["qvel"][0].numpy().astype(float).tolist()
        self.joint_pub.publish(js)
        for sensor, img_pub, info_pub in self.cameras:
            rgb = raw["sensor_data"][sensor]["rgb"][0].numpy()
            img_pub.publish(rgb_to_image(rgb, stamp, sensor))
            info_pub.publish(_camera_info(raw, sensor, rgb.shape, stamp))
        self.success_pub.publish(Bool(data=success))
        if self.clock_pub is not None:
            self.clock_pub.publish(Clock(clock=stamp))

    def close(self) -> None:
        self.running = False
        self.thread.join(timeout=5.0)
        self.env.close()


def _camera_info(raw: dict, sensor: str, shape: tuple, stamp) -> CameraInfo:
    info = CameraInfo()
    info.header.stamp, info.header.frame_id = stamp, sensor
    info.height, info.width = int(shape[0]), int(shape[1])
    info.distortion_model = "plumb_bob"
    info.d = [0.0] * 5
    params = raw.get("sensor_param", {}).get(sensor, {})
    if "intrinsic_cv" in params:
        K = np.asarray(params["intrinsic_cv"][0], dtype=float)
        info.k = K.reshape(-1).tolist()
        info.r = np.eye(3).reshape(-1).tolist()
        info.p = np.hstack([K, np.zeros((3, 1))]).reshape(-1).tolist()
    return info


def main(args: list[str] | None = None) -> int:
    return run_node_main(SimTwinNode, args)
