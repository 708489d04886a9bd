"""Messages to and from ros2_control controllers: joint_trajectory_controller or forward_command_controller.

Both the safety filter (which writes them) and the sim twin (which obeys them like the real controllers)
use these helpers, so the two sides cannot disagree on joint order or units.
"""

from __future__ import annotations

from dataclasses import dataclass

from builtin_interfaces.msg import Duration
from std_msgs.msg import Float64MultiArray, MultiArrayDimension
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

CONTROLLER_TYPES = ("joint_trajectory", "forward_command")


@dataclass(frozen=True)
class ControllerSpec:
    """Where commands go: the arm controller (and optionally a separate gripper topic)."""

    kind: str                      # joint_trajectory | forward_command
    topic: str                     # e.g. /joint_trajectory_controller/joint_trajectory
    joints: tuple[str, ...]        # joints commanded on `topic`, in the controller's configured order
    gripper_topic: str = ""        # Float64MultiArray [position] for a separately driven gripper, or ""
    gripper_joint: str = ""        # the joint whose target goes to gripper_topic

    def __post_init__(self) -> None:
        if self.kind not in CONTROLLER_TYPES:
            raise ValueError(f"controller type must be one of {CONTROLLER_TYPES}, got {self.kind!r}")
        if bool(self.gripper_topic) != bool(self.gripper_joint):
            raise ValueError("gripper_topic and gripper_joint go together")

    @property
    def message_type(self) -> type:
        return JointTrajectory if self.kind == "joint_trajectory" else Float64MultiArray


def duration(seconds: float) -> Duration:
    ns = int(round(seconds * 1e9))
    return Duration(sec=ns // 10**9, nanosec=ns % 10**9)


def arm_message(spec: ControllerSpec, targets: dict[str, float], velocities: dict[str, float], stamp, dt: float):
    """One command for the arm controller: a single timestamped trajectory point reached after dt, or the vector."""
    if spec.kind == "forward_command":
        return Float64MultiArray(data=[float(targets[j]) for j in spec.joints])
    msg = JointTrajectory()
    msg.header.stamp = stamp
    msg.joint_names = list(spec.joints)
    msg.points = [JointTrajectoryPoint(positions=[float(targets[j]) for j in spec.joints],
                                       velocities=[float(velocities.get(j, 0.0)) for j in spec.joints],
                                       time_from_start=duration(dt))]
    return msg


def trajectory_message(spec: ControllerSpec, points: list, stamp, dt: float) -> JointTrajectory:
    """One timed trajectory: point k (a Decision: targets and velocities) is reached (k + 1) * dt after `stamp`."""
    msg = JointTrajectory()
    msg.header.stamp = stamp
    msg.joint_names = list(spec.joints)
    msg.points = [JointTrajectoryPoint(positions=[float(d.targets[j]) for j in spec.joints],
                                       velocities=[float(d.velocities.get(j, 0.0)) for j in spec.joints],
                                       time_from_start=duration((k + 1) * dt)) for k, d in enumerate(points)]
    return msg


def gripper_message(spec: ControllerSpec, targets: dict[str, float]) -> Float64MultiArray | None:
    if not spec.gripper_topic or spec.gripper_joint not in targets:
        return None
    msg = Float64MultiArray(data=[float(targets[spec.gripper_joint])])
    msg.layout.dim = [MultiArrayDimension(label=spec.gripper_joint, size=1, stride=1)]
    return msg


def parse_arm_message(spec: ControllerSpec, msg) -> dict[str, float]:
    """Joint targets by name from a controller command (the last trajectory point is the target)."""
    if isinstance(msg, Float64MultiArray):
        if len(msg.data) != len(spec.joints):
            raise ValueError(f"command has {len(msg.data)} values for {len(spec.joints)} joints")
        return dict(zip(spec.joints, (float(v) for v in msg.data), strict=True))
    if not msg.points:
        raise ValueError("trajectory without points")
    point = msg.points[-1]
    if len(point.positions) != len(msg.joint_names):
        raise ValueError("trajectory point positions do not match joint_names")
    return dict(zip(msg.joint_names, (float(v) for v in point.positions), strict=True))


def trajectory_points(msg) -> list[tuple[float, dict[str, float]]] | None:
    """(seconds after the stamp, joint targets by name) of each point of a multi-point trajectory, else None."""
    if not isinstance(msg, JointTrajectory) or len(msg.points) < 2:
        return None
    for p in msg.points:
        if len(p.positions) != len(msg.joint_names):
            raise ValueError("trajectory point positions do not match joint_names")
    return [(p.time_from_start.sec + 1e-9 * p.time_from_start.nanosec,
             dict(zip(msg.joint_names, (float(v) for v in p.positions), strict=True))) for p in msg.points]
