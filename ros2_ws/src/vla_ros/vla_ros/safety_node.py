"""Safety filter node: the only publisher on the controller topics; policy and teleop commands pass through it.

Watchdogs run on a timer at the control rate: a stale joint state, no policy action for `late_action_s`
while the policy is in control, or no control-source message for `source_lease_s` while the policy or teleop
is in control (the eval manager re-sends it as a heartbeat; if it dies, nobody may keep driving the arm), makes
the arm hold. After a lapsed lease the policy regains control only after a `hold` or `teleop` message. The
software e-stop latches (topic or service) and only `~/reset_estop` clears it. In dry-run mode the filtered
commands go to `~/dry_run/<controller>` instead.
"""

from __future__ import annotations

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.node import Node
from sensor_msgs.msg import JointState
from std_msgs.msg import Bool, Float64MultiArray, String
from std_srvs.srv import Trigger

from vla_ros import topics
from vla_ros.actions import ActionSemantics
from vla_ros.controller_io import ControllerSpec, arm_message, gripper_message
from vla_ros.params import declare, require, run_node_main
from vla_ros.robot import RobotModel
from vla_ros.ros_util import JointStateCache, diagnostic
from vla_ros.safety import Decision, SafetyConfig, SafetyFilter

DEFAULTS = {
    "control_hz": 20.0,
    "controller_type": "joint_trajectory",
    "controller_topic": "/joint_trajectory_controller/joint_trajectory",
    "controller_joints": "str[]",            # default: arm + gripper joints
    "gripper_topic": "",
    "gripper_joint": "",
    "arm_joints": [f"panda_joint{i}" for i in range(1, 8)],
    "gripper_joints": ["panda_finger_joint1", "panda_finger_joint2"],
    "delta_reference": "measured",
    "action_low": "float[]",                  # default: -1 for every action dimension
    "action_high": "float[]",
    "urdf": "",
    "base_link": "panda_link0",
    "tcp_link": "panda_hand_tcp",
    "workspace_low": "float[]",               # TCP box in the base frame; empty: no workspace check
    "workspace_high": "float[]",
    "position_margin": 0.05,
    "velocity_margin": 0.05,
    "max_step_delta": 0.1,
    "acceleration_limits": "float[]",         # rad/s^2 per arm joint between consecutive commands; empty: none
    "stale_state_s": 0.25,
    "late_action_s": 0.3,
    "source_lease_s": 1.0,                    # 0: no lease (a control source holds until the next message)
    "dry_run": False,
    "diagnostics_hz": 2.0,
}


class SafetyFilterNode(Node):
    def __init__(self, name: str = "safety_filter", **node_kwargs):
        super().__init__(name, **node_kwargs)
        p = declare(self, DEFAULTS)
        sem = ActionSemantics(tuple(p["arm_joints"]), tuple(p["gripper_joints"]),
                              delta_reference=p["delta_reference"])
        n = len(sem.action_names)
        low = np.asarray(p["action_low"] or [-1.0] * n, float)
        high = np.asarray(p["action_high"] or [1.0] * n, float)
        require(low.shape == high.shape == (n,), f"action_low/action_high need {n} values ({sem.action_names})")
        robot = RobotModel(p["urdf"], p["base_link"], p["tcp_link"])
        ws_lo, ws_hi = p["workspace_low"], p["workspace_high"]
        require(len(ws_lo) in (0, 3) and len(ws_hi) == len(ws_lo), "workspace_low/high need 3 values each, or none")
        cfg = SafetyConfig(sem, robot.limits, p["control_hz"], low, high,
                           position_margin=p["position_margin"], velocity_margin=p["velocity_margin"],
                           max_step_delta=p["max_step_delta"], stale_state_s=p["stale_state_s"],
                           workspace_low=np.asarray(ws_lo, float) if ws_lo else None,
                           workspace_high=np.asarray(ws_hi, float) if ws_hi else None,
                           acceleration_limits=np.asarray(p["acceleration_limits"], float)
                           if p["acceleration_limits"] else None)
        self.filter = SafetyFilter(cfg, robot.base_T_tcp)
        joints = tuple(p["controller_joints"]) or (sem.joints if not p["gripper_topic"] else sem.arm_joints)
        self.ctrl = ControllerSpec(p["controller_type"], p["controller_topic"], joints, p["gripper_topic"],
                                   p["gripper_joint"])
        self.dt, self.late_s, self.dry_run = 1.0 / p["control_hz"], p["late_action_s"], p["dry_run"]
        require(p["source_lease_s"] >= 0, "source_lease_s must be >= 0 (0 turns the lease off)")
        self.lease_s = p["source_lease_s"]
        self.last_source_msg: float | None = None
        self.lease_lapsed = False
        self.pub = self.create_publisher(self.ctrl.message_type, self._out(self.ctrl.topic), topics.COMMAND_QOS)
        self.gripper_pub = None
        if self.ctrl.gripper_topic:
            self.gripper_pub = self.create_publisher(Float64MultiArray, self._out(self.ctrl.gripper_topic),
                                                     topics.COMMAND_QOS)
        self.diag_pub = self.create_publisher(DiagnosticArray, topics.DIAGNOSTICS, 10)
        self.joints = JointStateCache()
        self.source = "hold"
        self.last_action_time: float | None = None
        self.create_subscription(JointState, topics.JOINT_STATES, self.joints.update, topics.SENSOR_QOS)
        self.create_subscription(JointState, topics.POLICY_ACTION, self._on_policy, topics.COMMAND_QOS)
        self.create_subscription(JointState, topics.TELEOP_COMMAND, self._on_teleop, topics.COMMAND_QOS)
        self.create_subscription(String, topics.CONTROL_SOURCE, self._on_source, topics.LATCHED_QOS)
        self.create_subscription(Bool, topics.ESTOP, self._on_estop_topic, topics.COMMAND_QOS)
        self.create_service(Trigger, "~/estop", self._srv_estop)
        self.create_service(Trigger, "~/reset_estop", self._srv_reset)
        self.create_timer(self.dt, self._watchdog)
        self.create_timer(1.0 / p["diagnostics_hz"], self._publish_diag)
        self.get_logger().info(f"safety filter -> {self.ctrl.kind} on {self.ctrl.topic}"
                               f"{' (DRY RUN)' if self.dry_run else ''}")

    def _out(self, topic: str) -> str:
        """Dry run: the same messages, on a private topic no controller listens to."""
        return f"~/dry_run{topic}" if self.dry_run else topic

    # ----- inputs ------------------------------------------------------------------------------------------------
    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _measured(self):
        snap = self.joints.get()
        return (snap.positions, self._now() - snap.stamp) if snap else (None, float("inf"))

    def _on_policy(self, msg: JointState) -> None:
        if self.source != "policy":
            return  # a policy that lost control never reaches the arm
        self.last_action_time = self._now()
        names = list(self.filter.cfg.semantics.action_names)
        if list(msg.name) != names:
            self._emit(self.filter.hold(self._measured()[0], "bad_action_names"))
            return
        measured, age = self._measured()
        self._emit(self.filter.policy_action(np.asarray(msg.position, float), measured, age))

    def _on_teleop(self, msg: JointState) -> None:
        if self.source != "teleop":
            return
        measured, age = self._measured()
        if len(msg.name) != len(msg.position):
            self._emit(self.filter.hold(measured, "bad_teleop_command"))
            return
        targets = dict(zip(msg.name, (float(v) for v in msg.position), strict=True))
        self._emit(self.filter.joint_command(targets, measured, age))

    def _on_source(self, msg: String) -> None:
        self.last_source_msg = self._now()
        if msg.data not in topics.SOURCES:
            self.get_logger().error(f"unknown control source {msg.data!r}; holding")
            source = "hold"
        else:
            source = msg.data
        if self.lease_lapsed:
            if source == "policy":
                return  # a trial that lost its eval manager never resumes by itself
            self.lease_lapsed = False
        self._switch(source)

    def _switch(self, source: str, fault: str | None = None) -> None:
        """Change the control source; a hold caused by a fault is counted as an intervention for that reason."""
        if source != self.source:
            measured, _ = self._measured()
            if measured is not None:
                self.filter.rebase(measured)
            self.get_logger().info(f"control source {self.source} -> {source}")
            self.source, self.last_action_time = source, None
            if source == "hold":
                self._emit(self.filter.hold(measured, fault or "source_hold", intervention=fault is not None))

    def _on_estop_topic(self, msg: Bool) -> None:
        if msg.data:
            self._estop("e-stop topic")

    def _srv_estop(self, _req, resp):
        self._estop("e-stop service")
        resp.success, resp.message = True, "e-stop latched"
        return resp

    def _srv_reset(self, _req, resp):
        was = self.filter.estop_reason
        self.filter.reset_estop()
        self.get_logger().warning(f"e-stop reset (was: {was})")
        resp.success, resp.message = True, f"e-stop cleared (was: {was})"
        self._publish_diag()
        return resp

    def _estop(self, why: str) -> None:
        self.filter.trigger_estop(why)
        self.get_logger().error(f"E-STOP latched ({why}); holding until ~/reset_estop")
        self._emit(self.filter.hold(self._measured()[0], "estop_latched"))
        self._publish_diag()

    # ----- watchdog and output -----------------------------------------------------------------------------------
    def _watchdog(self) -> None:
        measured, age = self._measured()
        if self.filter.estop_reason is not None:
            self._emit(self.filter.hold(measured, "estop_latched"))
        elif measured is not None and age > self.filter.cfg.stale_state_s and self.source != "hold":
            self._emit(self.filter.hold(measured, "stale_joint_state"))
        elif self.source == "policy" and self.last_action_time is not None \
                and self._now() - self.last_action_time > self.late_s:
            self._emit(self.filter.hold(measured, "late_action"))
            self.last_action_time = self._now()  # one intervention per late period, not per tick
        if self.lease_s > 0 and self.source != "hold" and self.last_source_msg is not None \
                and self._now() - self.last_source_msg > self.lease_s:
            self.get_logger().error(f"control source lease lapsed: no {topics.CONTROL_SOURCE} message for "
                                    f"{self._now() - self.last_source_msg:.1f} s (eval manager gone?); holding "
                                    "until a hold or teleop message")
            self.lease_lapsed = True
            self._switch("hold", fault="source_lease_lapsed")
            self._publish_diag()

    def _emit(self, d: Decision) -> None:
        if d.reasons:
            self.get_logger().warning(f"intervention: {', '.join(d.reasons)}{' -> hold' if d.hold else ''}",
                                      throttle_duration_sec=1.0)
        if d.targets is None:
            return
        self.pub.publish(arm_message(self.ctrl, d.targets, d.velocities, self.get_clock().now().to_msg(), self.dt))
        if self.gripper_pub is not None:
            g = gripper_message(self.ctrl, d.targets)
            if g is not None:
                self.gripper_pub.publish(g)

    def _publish_diag(self) -> None:
        f = self.filter
        # Error level ends a running trial in the eval manager (if it is still there to hear it).
        level = "error" if f.estop_reason or self.lease_lapsed else ("warn" if f.counts else "ok")
        msg = (f"E-STOP: {f.estop_reason}" if f.estop_reason else
               "control source lease lapsed: holding" if self.lease_lapsed else f"source={self.source}")
        values = {"source": self.source, "estop": f.estop_reason or "", "dry_run": self.dry_run,
                  "lease_lapsed": self.lease_lapsed,
                  "interventions": sum(f.counts.values()), **{f"count/{k}": v for k, v in sorted(f.counts.items())}}
        self.diag_pub.publish(diagnostic(self.get_name(), level, msg, values, self.get_clock().now().to_msg()))


def main(args: list[str] | None = None) -> int:
    return run_node_main(SafetyFilterNode, args)
