"""The arm's model from its URDF: forward kinematics to the TCP (reusing calibration.kinematics) and limits.

The policy's state has `extra/tcp_pose` in the sim world frame ([x, y, z, qw, qx, qy, qz], ManiSkill
convention); the robot's base pose in that frame is a parameter, so the real arm reports the pose the
policy saw in training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from calibration.kinematics import PANDA_BASE_LINK, PANDA_TCP_LINK, Chain, maniskill_panda_urdf
from vla_ros.safety import JointLimit, urdf_joint_limits


def _quat_wxyz(R: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    x, y, z, w = Rotation.from_matrix(R).as_quat()
    return np.array([w, x, y, z])


def _pose_matrix(pose: list[float]) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    if len(pose) != 7:
        raise ValueError(f"base_pose must be [x, y, z, qw, qx, qy, qz], got {len(pose)} values")
    T = np.eye(4)
    qw, qx, qy, qz = pose[3:]
    T[:3, :3] = Rotation.from_quat([qx, qy, qz, qw]).as_matrix()
    T[:3, 3] = pose[:3]
    return T


class RobotModel:
    def __init__(self, urdf: str = "", base_link: str = PANDA_BASE_LINK, tcp_link: str = PANDA_TCP_LINK,
                 base_pose: list[float] | None = None):
        self.urdf = Path(urdf) if urdf else maniskill_panda_urdf("as the urdf parameter")
        self.chain = Chain(self.urdf, base_link, tcp_link)
        self.limits: dict[str, JointLimit] = urdf_joint_limits(self.urdf)
        self.world_T_base = _pose_matrix(base_pose if base_pose is not None else [0, 0, 0, 1, 0, 0, 0])

    def base_T_tcp(self, positions: dict[str, float]) -> np.ndarray:
        return self.chain.forward(positions)

    def tcp_pose_world(self, positions: dict[str, float]) -> np.ndarray:
        """[x, y, z, qw, qx, qy, qz] of the TCP in the world frame the policy was trained in."""
        T = self.world_T_base @ self.chain.forward(positions)
        return np.concatenate([T[:3, 3], _quat_wxyz(T[:3, :3])])
