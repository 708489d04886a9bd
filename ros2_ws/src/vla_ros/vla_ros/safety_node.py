"""Safety filter node: the only publisher on the controller topics; policy and teleop commands pass through it.

Watchdogs run on a timer at the control rate: a stale joint state, no policy action for `late_action_s`
while the policy is in control, or no control-source message for `source_lease_s` while the policy or teleop
is in control (the eval manager re-sends it as a heartbeat; if it dies, nobody may keep driving the arm), makes
the arm hold. After a lapsed lease the policy regains control only after a `hold` or `teleop` message. The
software e-stop latches (topic or service) and only `~/reset_estop` clears it. In dry-run mode the filtered
commands go to `~/dry_run/<controller>` instead.

Control authority: only control-source messages published by the `control_authority` node (the eval manager)
count; the publisher of each message is looked up in the ROS graph by its GID. Any other publisher is an
unauthorised source change: the arm holds, the diagnostics report it at error level (a running trial is aborted
with that reason) and the policy is refused until the authority sends `hold` or `teleop`.
Re-arming: after `~/reset_estop` the arm holds whatever the source, until `~/rearm` (the operator) or the
authority's next `teleop` -> `hold` sequence (the eval manager's RESET -> READY step).
Contracts: policy actions are refused until the policy's contract (`/vla/policy/spec`, the hello contract the
policy node received) has a control mode this filter executes, this robot's action joints in order and this
controller's `control_hz`; the action bounds and the scaling of each action onto the joints are then the
contract's. With a forward_command controller nothing is published until the controller's `joints` parameter
equals `controller_joints` (a wrong order would drive the wrong joints, even when holding).
Whole chunks (`send_whole_chunk`, joint_trajectory controllers): each chunk the policy node starts executing
(`/vla/policy/chunk`) goes to the controller as one timed JointTrajectory, a point per control step, each point
through the same checks as a single action (SafetyFilter.policy_chunk); the per-step actions then only prove
the policy alive (the late-action watchdog). A new chunk replaces the trajectory; every hold replaces it with
a single point where the arm is on it now, so the filter still holds on every fault.
With `trajectory_action` every arm command (trajectory, hold, teleop) is a FollowJointTrajectory goal to that
action server instead of a topic message (control_msgs; built for the PyPI wheels by vla_ros.build_control_msgs);
until the server answers nothing is sent, and the diagnostics say so at error level.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import ParameterType
from rcl_interfaces.srv import GetParameters
from rclpy.node import Node
from sensor_msgs.msg import JointState
from std_msgs.msg import Bool, Float64MultiArray, String
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory

from policy_runtime.contract import PANDA_ARM_JOINTS, PANDA_FINGER_JOINTS
from policy_runtime.protocol import Contract, ProtocolError
from vla_ros import topics
from vla_ros.actions import ActionSemantics
from vla_ros.controller_io import ControllerSpec, arm_message, gripper_message, trajectory_message
from vla_ros.params import ParamError, declare, require, run_node_main
from vla_ros.robot import RobotModel
from vla_ros.ros_util import JointStateCache, diagnostic
from vla_ros.safety import Decision, SafetyConfig, SafetyFilter

DEFAULTS = {
    "control_hz": 20.0,                       # the controller's rate: the policy's contract must state the same
    "controller_type": "joint_trajectory",
    "controller_topic": "/joint_trajectory_controller/joint_trajectory",
    "controller_joints": "str[]",            # default: arm + gripper joints
    "gripper_topic": "",
    "gripper_joint": "",
    "arm_joints": list(PANDA_ARM_JOINTS),       # the robot's joint names, in the policy's action order
    "gripper_joints": list(PANDA_FINGER_JOINTS),
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
    "control_authority": "/eval_manager",     # the only node whose control-source messages count
    "authority_grace_s": 1.0,                 # how long a new publisher may take to appear in the ROS graph
    "controller_node": "",                    # node with the controller's `joints`; default: the topic's namespace
    "verify_controller_joints": True,         # forward_command: publish nothing until the joint order is verified
    "dry_run": False,
    "diagnostics_hz": 2.0,
    "trajectory_action": "",                  # e.g. /joint_trajectory_controller/follow_joint_trajectory: commands
                                              # as FollowJointTrajectory goals instead of the topic (control_msgs)
    "send_whole_chunk": False,                # joint_trajectory: each chunk as one timed trajectory (policy node's
                                              # publish_chunks), not one point per control step
}


class SafetyFilterNode(Node):
    def __init__(self, name: str = "safety_filter", **node_kwargs):
        super().__init__(name, **node_kwargs)
        p = declare(self, DEFAULTS)
        require(p["control_hz"] > 0, "control_hz must be > 0")
        # The robot's joints; the mode, scaling and bounds come with the policy's contract (none until then).
        sem = ActionSemantics(tuple(p["arm_joints"]), tuple(p["gripper_joints"]))
        self.robot_actions = sem.action_names
        low = high = np.zeros(0)
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
        self.control_hz = p["control_hz"]
        self.dt, self.late_s, self.dry_run = 1.0 / p["control_hz"], p["late_action_s"], p["dry_run"]
        require(p["source_lease_s"] >= 0, "source_lease_s must be >= 0 (0 turns the lease off)")
        self.lease_s = p["source_lease_s"]
        self.last_source_msg: float | None = None
        self.last_source_arrival = -math.inf  # monotonic arrival time of the authority's last applied message
        self.lease_lapsed = False
        self.authority = node_path(p["control_authority"])
        require(self.authority != "/", "control_authority must name the eval manager node, e.g. /eval_manager")
        require(p["authority_grace_s"] > 0, "authority_grace_s must be > 0")
        self.grace_s = p["authority_grace_s"]
        self.pending_sources: list[tuple[str, bytes, float]] = []  # (source, publisher GID, arrival) in order
        self.requested = "hold"                # the last source the authority asked for
        self.intrusion: str | None = None      # an unauthorised source change: policy refused until hold/teleop
        self.armed, self.rearm_teleop_seen = True, False
        self.contract_ok, self.contract_problem = False, None
        self.controller_problem = self._start_controller_check(p)
        self.pub = self.create_publisher(self.ctrl.message_type, self._out(self.ctrl.topic), topics.COMMAND_QOS)
        self.whole_chunk = bool(p["send_whole_chunk"])
        require(not self.whole_chunk or (self.ctrl.kind == "joint_trajectory" and not self.ctrl.gripper_topic),
                "send_whole_chunk needs controller_type joint_trajectory with the gripper on the same controller "
                "(no gripper_topic): a timed trajectory cannot be split across two controllers")
        self.trajectory: tuple[float, list[dict[str, float]]] | None = None  # (sent at, targets per point)
        self.chunk_until = -math.inf  # when the last chunk's actions end: a step's action after that had no chunk
        self.unchunked_since: float | None = None  # the first such action (its chunk may still be on its way)
        if self.whole_chunk:
            self.create_subscription(JointTrajectory, topics.POLICY_CHUNK, self._on_chunk, topics.COMMAND_QOS)
        self.action_client = None
        if p["trajectory_action"] and not self.dry_run:  # a dry run never reaches a controller: the topic stays
            self._start_action_client(p["trajectory_action"])
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
        self.create_subscription(String, topics.CONTROL_SOURCE, self._on_source, topics.SOURCE_AUDIT_QOS)
        self.create_subscription(Bool, topics.ESTOP, self._on_estop_topic, topics.COMMAND_QOS)
        self.create_service(Trigger, "~/estop", self._srv_estop)
        self.create_service(Trigger, "~/reset_estop", self._srv_reset)
        self.create_service(Trigger, "~/rearm", self._srv_rearm)
        self.create_subscription(String, topics.POLICY_SPEC, self._on_spec, topics.LATCHED_QOS)
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
        if not self.contract_ok:  # never execute actions whose meaning was not agreed
            reason = "policy_contract" if self.contract_problem else "no_policy_contract"
            self._emit(self._hold(self._measured()[0], reason))
            return
        names = list(self.filter.cfg.semantics.action_names)
        if list(msg.name) != names:
            self._emit(self._hold(self._measured()[0], "bad_action_names"))
            return
        if self.whole_chunk:  # the chunk's trajectory is running: this step's action only shows the policy is alive
            self._check_chunked()
            return
        measured, age = self._measured()
        self._emit(self.filter.policy_action(np.asarray(msg.position, float), measured, age))

    def _check_chunked(self) -> None:
        """Actions without chunks for `late_action_s` (the policy node does not publish them) make the arm hold."""
        now = self._now()
        if now <= self.chunk_until:
            self.unchunked_since = None
        elif self.unchunked_since is None:
            self.unchunked_since = now  # the chunk may still be on its way (another topic)
        elif now - self.unchunked_since > self.late_s:
            self.get_logger().error(f"policy actions without a chunk on {topics.POLICY_CHUNK} (send_whole_chunk "
                                    "needs policy_node publish_chunks: true); holding", throttle_duration_sec=2.0)
            self._emit(self._hold(self._measured()[0], "no_chunk"))
            self.unchunked_since = now  # one intervention per late period, as late_action

    def _on_chunk(self, msg: JointTrajectory) -> None:
        """A chunk starting now: its validated remainder as one timed trajectory (replacing the running one)."""
        if self.source != "policy":
            return
        self.last_action_time = self._now()
        if not self.contract_ok:
            self._emit(self._hold(self._measured()[0], "policy_contract" if self.contract_problem else
                                  "no_policy_contract"))
            return
        if list(msg.joint_names) != list(self.filter.cfg.semantics.action_names) or not msg.points:
            self._emit(self._hold(self._measured()[0], "bad_action_names"))
            return
        measured, age = self._measured()
        self._cut_trajectory()
        self.chunk_until, self.unchunked_since = self._now() + (len(msg.points) + 1) * self.dt + self.late_s, None
        points = self.filter.policy_chunk(np.asarray([p.positions for p in msg.points], float), measured, age)
        if points[0].hold:
            self._emit(points[0])
            return
        if self.controller_problem is None:
            reasons = sorted({r for d in points for r in d.reasons})
            if reasons or len(points) < len(msg.points):
                self.get_logger().warning(f"chunk: {', '.join(reasons) or 'limited'}; {len(points)} of "
                                          f"{len(msg.points)} points sent", throttle_duration_sec=1.0)
            self._send_arm(trajectory_message(self.ctrl, points, self.get_clock().now().to_msg(), self.dt))
            self.trajectory = (self._now(), [d.targets for d in points])

    def _start_action_client(self, name: str) -> None:
        """Commands as FollowJointTrajectory goals; until the controller's action server answers, nothing is sent."""
        require(self.ctrl.kind == "joint_trajectory", "trajectory_action needs controller_type joint_trajectory")
        try:
            from control_msgs.action import FollowJointTrajectory
        except ImportError:
            raise ParamError("trajectory_action needs control_msgs (from your ROS 2 install, or built for the PyPI "
                             "wheels: python -m vla_ros.build_control_msgs, docs/ros2.md)") from None
        from rclpy.action import ActionClient

        self.goal_type = FollowJointTrajectory.Goal
        self.action_client, self.action_name = ActionClient(self, FollowJointTrajectory, name), name
        self.goals_rejected = 0
        self.controller_problem = f"no FollowJointTrajectory action server at {name} yet"
        self.action_timer = self.create_timer(0.5, self._check_action_server)

    def _check_action_server(self) -> None:
        if self.action_client.server_is_ready():
            self.action_timer.cancel()
            self.get_logger().info(f"FollowJointTrajectory server {self.action_name} ready")
            self.controller_problem = None
            self._publish_diag()

    def _send_arm(self, msg) -> None:
        """To the controller: on its topic, or as a goal (a new goal preempts the running one, as a message does)."""
        if self.action_client is None:
            self.pub.publish(msg)
            return
        self.action_client.send_goal_async(self.goal_type(trajectory=msg)).add_done_callback(self._on_goal_response)

    def _on_goal_response(self, future) -> None:
        handle = future.result() if not future.exception() else None
        if handle is None or not handle.accepted:
            self.goals_rejected += 1
            self.get_logger().error("the controller rejected a trajectory goal; the arm keeps its previous one",
                                    throttle_duration_sec=1.0)

    def _hold(self, measured, reason: str, intervention: bool = True):
        """The filter's hold, at the point the arm has reached on a running trajectory (not at its end)."""
        self._cut_trajectory()
        return self.filter.hold(measured, reason, intervention=intervention)

    def _cut_trajectory(self) -> None:
        if self.trajectory is None:
            return
        sent, targets = self.trajectory
        self.trajectory = None
        k = min(len(targets) - 1, max(0, int((self._now() - sent) / self.dt)))  # the point being approached
        self.filter.cut(targets[k])

    def _on_teleop(self, msg: JointState) -> None:
        if self.source != "teleop":
            return
        measured, age = self._measured()
        if len(msg.name) != len(msg.position):
            self._emit(self._hold(measured, "bad_teleop_command"))
            return
        targets = dict(zip(msg.name, (float(v) for v in msg.position), strict=True))
        self._emit(self.filter.joint_command(targets, measured, age))

    # ----- control authority -------------------------------------------------------------------------------------
    def _on_source(self, msg: String, info: dict) -> None:
        gid = info.get("publisher_gid") or {}  # rclpy passes MessageInfo to a two-argument callback
        self.pending_sources.append((msg.data, bytes(gid.get("data", b"")), time.monotonic()))
        self._resolve_sources()

    def _resolve_sources(self) -> None:
        """Apply queued control-source messages, each once its publisher is known (or its grace is over).

        A message whose publisher the ROS graph does not show yet waits without holding up the others: a stray
        message from a publisher that is still being discovered (or already gone) must not stall the eval
        manager's heartbeats until the lease lapses. Once identified, it is applied unless the authority has
        spoken since it arrived (an old word never overrides a newer one).
        """
        waiting = []
        for data, gid, arrived in self.pending_sources:
            who = self._publisher_of(gid)
            if who is None and time.monotonic() - arrived < self.grace_s:
                waiting.append((data, gid, arrived))  # the ROS graph has not caught up yet: next watchdog tick
            elif who == self.authority and self.last_source_arrival > arrived:
                continue  # superseded by a newer message of the authority
            else:
                self._apply_source(data, who or "an unidentified publisher", arrived)
        self.pending_sources = waiting

    def _publisher_of(self, gid: bytes) -> str | None:
        """Fully qualified name of the node that owns publisher `gid` on the control-source topic, if known."""
        for ep in self.get_publishers_info_by_topic(topics.CONTROL_SOURCE) if gid else ():
            own = bytes(ep.endpoint_gid)
            if own and gid[:len(own)] == own and not gid[len(own):].strip(b"\0"):
                return None if ep.node_name.startswith("_NODE_NAME_UNKNOWN") else node_path(ep.node_namespace,
                                                                                            ep.node_name)
        return None

    def _apply_source(self, data: str, who: str, arrived: float) -> None:
        if who != self.authority:
            self._unauthorised(f"{data!r} from {who} (only {self.authority} may set it)")
            return
        self.last_source_msg = self._now()
        self.last_source_arrival = arrived
        if data not in topics.SOURCES:
            self.get_logger().error(f"unknown control source {data!r}; holding")
            source = "hold"
        else:
            source = data
        self.requested = source
        if self.lease_lapsed or self.intrusion:
            if source == "policy":
                return  # a trial that lost its eval manager, or was interfered with, never resumes by itself
            self.lease_lapsed, self.intrusion = False, None
            self._publish_diag()
        if not self.armed:
            if source == "hold" and self.rearm_teleop_seen:
                self._rearm("the eval manager's next start (teleop -> hold)")
            else:
                self.rearm_teleop_seen |= source == "teleop"
                return
        self._switch(source)

    def _unauthorised(self, why: str) -> None:
        """A source change the authority did not make: hold, and say so at error level until it sends hold/teleop."""
        self.intrusion = why
        self.get_logger().error(f"unauthorised control source {why}; holding until {self.authority} sends hold "
                                "or teleop", throttle_duration_sec=1.0)
        self._switch("hold")
        self._emit(self._hold(self._measured()[0], "unauthorised_source"))
        self._publish_diag()

    def _rearm(self, by: str) -> None:
        self.armed, self.rearm_teleop_seen = True, False
        self.get_logger().warning(f"re-armed by {by}")
        self._publish_diag()

    def _switch(self, source: str, fault: str | None = None) -> None:
        """Change the control source; a hold caused by a fault is counted as an intervention for that reason."""
        if source != self.source:
            measured, _ = self._measured()
            self._cut_trajectory()
            if measured is not None:
                self.filter.rebase(measured)
            self.get_logger().info(f"control source {self.source} -> {source}")
            self.source, self.last_action_time = source, None
            if source == "hold":
                self._emit(self._hold(measured, fault or "source_hold", intervention=fault is not None))

    def _on_estop_topic(self, msg: Bool) -> None:
        if msg.data:
            self._estop("e-stop topic")

    def _srv_estop(self, _req, resp):
        self._estop("e-stop service")
        resp.success, resp.message = True, "e-stop latched"
        return resp

    def _srv_reset(self, _req, resp):
        """Clear the latch, but keep holding: motion needs a separate, deliberate re-arm."""
        was = self.filter.estop_reason
        if was is None:
            resp.success, resp.message = True, "no e-stop latched"
            return resp
        self.filter.reset_estop()
        self.armed, self.rearm_teleop_seen = False, False
        self._switch("hold")
        resp.success, resp.message = True, (f"e-stop cleared (was: {was}); the arm holds until re-armed "
                                            "(~/rearm, or the eval manager's next start)")
        self.get_logger().warning(resp.message)
        self._publish_diag()
        return resp

    def _srv_rearm(self, _req, resp):
        """The operator's explicit re-arm after an e-stop reset: the authority's current source applies again."""
        if self.filter.estop_reason is not None:
            resp.success, resp.message = False, f"e-stop latched ({self.filter.estop_reason}): reset it first"
        elif self.armed:
            resp.success, resp.message = True, f"already armed (source {self.source})"
        else:
            self._rearm("the operator (~/rearm)")
            if not (self.requested == "policy" and (self.lease_lapsed or self.intrusion)):
                self._switch(self.requested)
            resp.success, resp.message = True, f"re-armed: control source {self.source}"
        return resp

    # ----- contracts ---------------------------------------------------------------------------------------------
    def _on_spec(self, msg: String) -> None:
        """The policy's contract: its actions mean what this filter executes, or they are never executed."""
        try:
            ctrl = Contract.from_wire(json.loads(msg.data)).controller
        except (ValueError, ProtocolError) as e:
            problem = f"unreadable policy contract ({type(e).__name__}: {e})"
        else:
            problem = self._contract_problem(ctrl)
        if problem:
            self.get_logger().error(f"{problem}: policy actions refused")
        else:
            cfg = self.filter.cfg
            sem = ActionSemantics.from_controller(ctrl, cfg.semantics.gripper_joints)
            self.filter.cfg = replace(cfg, semantics=sem, action_low=np.asarray(ctrl.action_low, float),
                                      action_high=np.asarray(ctrl.action_high, float))
            if not self.contract_ok:
                self.get_logger().info(f"policy contract accepted: {ctrl.control_mode} at {ctrl.control_hz:g} Hz, "
                                       f"actions {list(ctrl.action_joints)} in [{list(ctrl.action_low)}, "
                                       f"{list(ctrl.action_high)}]")
        self.contract_ok, self.contract_problem = problem is None, problem
        if problem and self.source == "policy":
            self._emit(self._hold(self._measured()[0], "policy_contract"))
        self._publish_diag()

    def _contract_problem(self, ctrl) -> str | None:
        """The first way the policy's controller differs from what this robot executes, naming both values."""
        try:
            ActionSemantics.from_controller(ctrl, ())
        except ValueError as e:
            return str(e)
        if not ctrl.action_joints:
            return f"the policy's contract names no action joints (the robot's: {list(self.robot_actions)})"
        problems = ctrl.mismatches(action_joints=self.robot_actions, control_hz=self.control_hz)
        return problems[0] if problems else None

    def _start_controller_check(self, p: dict) -> str | None:
        """forward_command messages are bare vectors: verify their order against the controller's `joints`."""
        if self.ctrl.kind != "forward_command" or not p["verify_controller_joints"]:
            return None
        self.controller_node = node_path(p["controller_node"] or self.ctrl.topic.rsplit("/", 1)[0])
        require(self.controller_node != "/", "controller_node is needed: the controller topic has no namespace")
        self.param_client = self.create_client(GetParameters, f"{self.controller_node}/get_parameters")
        self.param_future = None
        self.verify_timer = self.create_timer(0.5, self._verify_controller)
        return f"controller joint order not verified yet (no reply from {self.controller_node}/get_parameters)"

    def _verify_controller(self) -> None:
        if self.param_future is not None and not self.param_future.done():
            return
        if not self.param_client.service_is_ready():
            self.get_logger().warning(f"{self.controller_problem}; nothing is sent to the controller",
                                      throttle_duration_sec=5.0)
            return
        self.param_future = self.param_client.call_async(GetParameters.Request(names=["joints"]))
        self.param_future.add_done_callback(self._on_controller_joints)

    def _on_controller_joints(self, future) -> None:
        ours = list(self.ctrl.joints)
        try:
            values = future.result().values
        except Exception as e:  # the controller went away mid-call: ask again
            self.get_logger().warning(f"{self.controller_node}/get_parameters failed: {e}")
            return
        theirs = list(values[0].string_array_value) if values and \
            values[0].type == ParameterType.PARAMETER_STRING_ARRAY else None
        if theirs is None:
            problem = f"controller {self.controller_node} has no `joints` parameter to check controller_joints {ours}"
        elif theirs != ours:
            problem = f"controller_joints {ours} do not match {self.controller_node} joints {theirs}"
        else:
            problem = None
            self.verify_timer.cancel()
            self.get_logger().info(f"controller {self.controller_node} joint order verified: {ours}")
        if problem and problem != self.controller_problem:
            self.get_logger().error(f"{problem}: nothing is sent to the controller")
        self.controller_problem = problem
        self._publish_diag()

    def _estop(self, why: str) -> None:
        self.filter.trigger_estop(why)
        self.get_logger().error(f"E-STOP latched ({why}); holding until ~/reset_estop")
        self._emit(self._hold(self._measured()[0], "estop_latched"))
        self._publish_diag()

    # ----- watchdog and output -----------------------------------------------------------------------------------
    def _watchdog(self) -> None:
        self._resolve_sources()
        measured, age = self._measured()
        if self.filter.estop_reason is not None:
            self._emit(self._hold(measured, "estop_latched"))
        elif measured is not None and age > self.filter.cfg.stale_state_s and self.source != "hold":
            self._emit(self._hold(measured, "stale_joint_state"))
        elif self.source == "policy" and self.last_action_time is not None \
                and self._now() - self.last_action_time > self.late_s:
            self._emit(self._hold(measured, "late_action"))
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
        if self.controller_problem is not None:
            return  # the controller's joint order is unknown or different: even a hold could move the wrong joints
        if d.reasons:
            self.get_logger().warning(f"intervention: {', '.join(d.reasons)}{' -> hold' if d.hold else ''}",
                                      throttle_duration_sec=1.0)
        if d.targets is None:
            return
        self._send_arm(arm_message(self.ctrl, d.targets, d.velocities, self.get_clock().now().to_msg(), self.dt))
        if self.gripper_pub is not None:
            g = gripper_message(self.ctrl, d.targets)
            if g is not None:
                self.gripper_pub.publish(g)

    def _publish_diag(self) -> None:
        f = self.filter
        # Error level ends a running trial in the eval manager (if it is still there to hear it) and keeps the
        # next one from starting; so does a filter that is not armed.
        errors = [f"E-STOP: {f.estop_reason}" if f.estop_reason else None, self.controller_problem,
                  f"policy contract: {self.contract_problem}" if self.contract_problem else None,
                  f"unauthorised control source {self.intrusion}: holding" if self.intrusion else None,
                  "control source lease lapsed: holding" if self.lease_lapsed else None]
        errors = [e for e in errors if e]
        level = "error" if errors else ("warn" if f.counts or not self.armed else "ok")
        msg = errors[0] if errors else ("e-stop reset: holding until re-armed (~/rearm or the eval manager's next "
                                        "start)" if not self.armed else f"source={self.source}")
        values = {"source": self.source, "estop": f.estop_reason or "", "dry_run": self.dry_run,
                  "lease_lapsed": self.lease_lapsed, "armed": self.armed, "authority": self.authority,
                  "unauthorised": self.intrusion or "", "controller": self.controller_problem or "ok",
                  "contract": "ok" if self.contract_ok else (self.contract_problem or "none yet"),
                  "interventions": sum(f.counts.values()), **{f"count/{k}": v for k, v in sorted(f.counts.items())},
                  **({"goals_rejected": self.goals_rejected} if self.action_client is not None else {})}
        self.diag_pub.publish(diagnostic(self.get_name(), level, msg, values, self.get_clock().now().to_msg()))


def node_path(namespace: str, name: str = "") -> str:
    """'/ns/name' with single slashes, from a namespace and a name or from one (possibly relative) path."""
    return "/" + "/".join(part for part in f"{namespace}/{name}".split("/") if part)


def main(args: list[str] | None = None) -> int:
    return run_node_main(SafetyFilterNode, args)
