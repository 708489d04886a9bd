"""Build the policy's observation from ROS inputs: images resized to the model, state blocks by joint name.

The state vector follows the contract's `state_layout`; each block has one source on the robot:
`agent/qpos` and `agent/qvel` from `/joint_states` (by name, never by index), `extra/tcp_pose` from forward
kinematics. A layout block with no robot-side source is refused at handshake time, not guessed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from vla_ros.ros_util import JointSnapshot

SUPPORTED_BLOCKS = ("agent/qpos", "agent/qvel", "extra/tcp_pose")


class ObservationError(Exception):
    """The observation cannot be used (stale, misaligned, missing); the message is the logged reason."""


@dataclass(frozen=True)
class StateBuilder:
    layout: tuple[tuple[str, int], ...]
    joints: tuple[str, ...]
    tcp_pose: Callable[[dict[str, float]], np.ndarray]

    def __post_init__(self) -> None:
        for name, size in self.layout:
            if name not in SUPPORTED_BLOCKS:
                raise ValueError(f"the model's state block {name!r} has no source on this robot "
                                 f"(supported: {', '.join(SUPPORTED_BLOCKS)})")
            want = 7 if name == "extra/tcp_pose" else len(self.joints)
            if size != want:
                raise ValueError(f"state block {name} has size {size}; this robot provides {want} "
                                 f"(state_joints: {list(self.joints)})")

    def build(self, snap: JointSnapshot) -> np.ndarray:
        missing = [j for j in self.joints if j not in snap.positions]
        if missing:
            raise ObservationError(f"joint_states lacks {', '.join(missing)}")
        parts = []
        for name, _ in self.layout:
            if name == "agent/qpos":
                parts.append([snap.positions[j] for j in self.joints])
            elif name == "agent/qvel":
                parts.append([snap.velocities.get(j, 0.0) for j in self.joints])
            else:
                parts.append(self.tcp_pose(snap.positions))
        return np.concatenate([np.asarray(p, dtype=np.float32) for p in parts])


def fit_image(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Area-resize to the model's resolution (what the sim adapter does with torch's area mode)."""
    if rgb.shape[:2] == (height, width):
        return rgb
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)


def check_timing(now: float, image_stamps: dict[str, float], state_stamp: float, max_age_s: float,
                 max_skew_s: float) -> None:
    """Refuse observations that are too old, or whose cameras and joint state were not taken together."""
    if now - state_stamp > max_age_s:
        raise ObservationError(f"joint state is {now - state_stamp:.3f} s old (max {max_age_s} s)")
    for cam, t in image_stamps.items():
        if now - t > max_age_s:
            raise ObservationError(f"camera {cam} frame is {now - t:.3f} s old (max {max_age_s} s)")
        if abs(t - state_stamp) > max_skew_s:
            raise ObservationError(f"camera {cam} and joint state are {abs(t - state_stamp):.3f} s apart "
                                   f"(max {max_skew_s} s)")
