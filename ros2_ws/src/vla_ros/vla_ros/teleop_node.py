"""Teleop for the operator's scene resets: keyboard (terminal) and sensor_msgs/Joy -> joint or Cartesian jogs.

Commands are absolute joint targets on /vla/teleop/command, which only the safety filter reads, and only
while the eval manager has given control to teleop (RESET). Keys: 1-7 select a joint, +/- jog it; c toggles
Cartesian mode, where x/X y/Y z/Z move the TCP; g opens/closes the gripper. Joy: each axis in `joy_axes`
drives one joint (joint mode) or x, y, z (the first three, Cartesian mode); button `joy_mode_button`
toggles the mode. Joystick jogs run at the policy contract's control rate (latched on /vla/policy/spec), so
they wait for the policy node's handshake; key presses act at once.
"""

from __future__ import annotations

import json
import threading

import numpy as np
from rclpy.node import Node
from sensor_msgs.msg import JointState, Joy
from std_msgs.msg import String

from policy_runtime.contract import PANDA_ARM_JOINTS, PANDA_FINGER_JOINTS
from policy_runtime.protocol import Contract, ProtocolError
from vla_ros import console, topics
from vla_ros.jog import cartesian_jog, joint_jog
from vla_ros.params import declare, run_node_main
from vla_ros.robot import RobotModel
from vla_ros.ros_util import JointStateCache

DEFAULTS = {
    "arm_joints": list(PANDA_ARM_JOINTS),
    "gripper_joints": list(PANDA_FINGER_JOINTS),
    "gripper_open": 0.04,
    "gripper_closed": 0.0,
    "joint_step": 0.03,
    "cartesian_step": 0.01,
    "joy_topic": "/joy",
    "joy_axes": [0, 1, 2, 3, 4, 5, 6],
    "joy_scale": 0.5,
    "joy_deadzone": 0.1,
    "joy_mode_button": 0,
    "urdf": "",
    "base_link": "panda_link0",
    "tcp_link": "panda_hand_tcp",
    "console": True,
}
CART_KEYS = {"x": (0, 1), "X": (0, -1), "y": (1, 1), "Y": (1, -1), "z": (2, 1), "Z": (2, -1)}


class TeleopNode(Node):
    def __init__(self, name: str = "teleop", **node_kwargs):
        super().__init__(name, **node_kwargs)
        p = declare(self, DEFAULTS)
        self.p = p
        self.arm = tuple(p["arm_joints"])
        self.robot = RobotModel(p["urdf"], p["base_link"], p["tcp_link"])
        self.joints = JointStateCache()
        self.lock = threading.Lock()
        self.active, self.cartesian = False, False
        self.selected = 0
        self.target: dict[str, float] | None = None
        self.joy_axes: list[float] = []
        self._button_down = False
        self.pub = self.create_publisher(JointState, topics.TELEOP_COMMAND, topics.COMMAND_QOS)
        self.create_subscription(JointState, topics.JOINT_STATES, self.joints.update, topics.SENSOR_QOS)
        self.create_subscription(String, topics.CONTROL_SOURCE, self._on_source, topics.LATCHED_QOS)
        self.create_subscription(Joy, p["joy_topic"], self._on_joy, 10)
        self.control_hz: float | None = None  # the contract's; the joystick timer starts with it
        self.joy_timer = None
        self.create_subscription(String, topics.POLICY_SPEC, self._on_contract, topics.LATCHED_QOS)
        if p["console"]:
            console.register("1234567+-=cgxXyYzZ", self.key)

    def _on_source(self, msg: String) -> None:
        with self.lock:
            active = msg.data == "teleop"
            if active != self.active:  # the source is re-sent as a heartbeat; only a change restarts the jog
                self.target = None  # start from where the arm is, never from an old target
            self.active = active

    def _on_contract(self, msg: String) -> None:
        try:
            hz = Contract.from_wire(json.loads(msg.data)).control_hz
        except (ValueError, ProtocolError) as e:
            self.get_logger().error(f"unreadable policy contract ({e}): joystick jogs keep their rate")
            return
        if hz == self.control_hz or not hz > 0:
            return
        if self.joy_timer is not None:
            self.destroy_timer(self.joy_timer)
        with self.lock:
            self.control_hz = hz
        self.joy_timer = self.create_timer(1.0 / hz, self._tick)

    def _on_joy(self, msg: Joy) -> None:
        b = self.p["joy_mode_button"]
        with self.lock:
            if 0 <= b < len(msg.buttons) and msg.buttons[b] and not self._button_down:
                self.cartesian = not self.cartesian
            self._button_down = 0 <= b < len(msg.buttons) and bool(msg.buttons[b])
            self.joy_axes = list(msg.axes)

    def _current(self) -> dict[str, float] | None:
        if self.target is None:
            snap = self.joints.get()
            if snap is None or any(j not in snap.positions for j in self.arm):
                return None
            self.target = {j: snap.positions[j] for j in (*self.arm, *self.p["gripper_joints"])
                           if j in snap.positions}
        return self.target

    def key(self, k: str) -> None:
        """Apply one key press (also the programmatic entry point of tests)."""
        with self.lock:
            if not self.active or self._current() is None:
                return
            t = self.target
            if k in "1234567" and int(k) <= len(self.arm):
                self.selected = int(k) - 1
            elif k in "+=-":
                self.target = joint_jog(t, self.arm[self.selected], self.p["joint_step"] * (-1 if k == "-" else 1))
            elif k == "c":
                self.cartesian = not self.cartesian
            elif k == "g":
                fingers = self.p["gripper_joints"]
                if fingers:
                    closed = t.get(fingers[0], 0.0) > 0.5 * (self.p["gripper_open"] + self.p["gripper_closed"])
                    value = self.p["gripper_closed"] if closed else self.p["gripper_open"]
                    self.target = {**t, **{f: value for f in fingers}}
            elif k in CART_KEYS:
                axis, sign = CART_KEYS[k]
                d = np.zeros(3)
                d[axis] = sign * self.p["cartesian_step"]
                self.target = cartesian_jog(t, self.arm, d, self.robot.base_T_tcp)
            self._publish()

    def _tick(self) -> None:
        with self.lock:
            axes = [a if abs(a) > self.p["joy_deadzone"] else 0.0 for a in self.joy_axes]
            if not self.active or not any(axes) or self._current() is None:
                return
            scale = self.p["joy_scale"] / self.control_hz
            mapping = [i for i in self.p["joy_axes"] if 0 <= i < len(axes)]
            if self.cartesian:
                d = np.array([axes[i] for i in mapping[:3]] + [0.0] * (3 - len(mapping[:3]))) * scale * 0.2
                self.target = cartesian_jog(self.target, self.arm, d, self.robot.base_T_tcp)
            else:
                for joint, i in zip(self.arm, mapping, strict=False):
                    self.target = joint_jog(self.target, joint, axes[i] * scale)
            self._publish()

    def _publish(self) -> None:
        msg = JointState(name=list(self.target), position=[float(v) for v in self.target.values()])
        msg.header.stamp = self.get_clock().now().to_msg()
        self.pub.publish(msg)

    def close(self) -> None:
        console.close()


def main(args: list[str] | None = None) -> int:
    return run_node_main(TeleopNode, args)
