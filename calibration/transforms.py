"""Rigid transforms and the camera axis conventions (OpenCV vs SAPIEN), in plain numpy.

Every pose is a 4x4 homogeneous matrix `a_T_b` (maps points in frame b to frame a); quaternions are
converted only at the file boundaries, where each format states its order.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

# Columns: SAPIEN camera axes (x forward, y left, z up) written in OpenCV camera axes (x right, y down, z forward).
CV_R_SAPIEN = np.array([[0.0, -1.0, 0.0],
                        [0.0, 0.0, -1.0],
                        [1.0, 0.0, 0.0]])


def make_T(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = np.asarray(R, dtype=np.float64).reshape(3, 3)
    T[:3, 3] = np.asarray(t, dtype=np.float64).reshape(3)
    return T


def inv_T(T: np.ndarray) -> np.ndarray:
    """Inverse of a rigid transform (exact, no general matrix inverse)."""
    R, t = T[:3, :3], T[:3, 3]
    return make_T(R.T, -R.T @ t)


def rotation_angle_deg(R: np.ndarray) -> float:
    """Angle of a rotation matrix in degrees (robust near 0 and 180)."""
    return float(np.degrees(Rotation.from_matrix(R).magnitude()))


def pose_difference(A: np.ndarray, B: np.ndarray) -> tuple[float, float]:
    """(translation distance in mm, rotation angle in degrees) between two poses of the same frame."""
    dt = float(np.linalg.norm(A[:3, 3] - B[:3, 3])) * 1000.0
    return dt, rotation_angle_deg(A[:3, :3].T @ B[:3, :3])


def mean_pose(Ts: list[np.ndarray]) -> np.ndarray:
    """Chordal mean of rotations and arithmetic mean of translations."""
    R = Rotation.from_matrix(np.stack([T[:3, :3] for T in Ts])).mean().as_matrix()
    return make_T(R, np.mean([T[:3, 3] for T in Ts], axis=0))


def quat_xyzw(R: np.ndarray) -> np.ndarray:
    """Unit quaternion (x, y, z, w) with w >= 0, as ROS tf expects."""
    q = Rotation.from_matrix(R).as_quat()
    return -q if q[3] < 0 else q


def from_pos_quat_xyzw(p, q_xyzw) -> np.ndarray:
    return make_T(Rotation.from_quat(q_xyzw).as_matrix(), p)


def cv_camera_to_sapien(world_T_cam_cv: np.ndarray) -> np.ndarray:
    """Pose of a camera given in OpenCV axes -> the same camera's pose in SAPIEN camera axes."""
    T = world_T_cam_cv.copy()
    T[:3, :3] = world_T_cam_cv[:3, :3] @ CV_R_SAPIEN
    return T


def sapien_camera_to_cv(world_T_cam_sapien: np.ndarray) -> np.ndarray:
    T = world_T_cam_sapien.copy()
    T[:3, :3] = world_T_cam_sapien[:3, :3] @ CV_R_SAPIEN.T
    return T


def to_sapien_pose_list(T: np.ndarray) -> list[float]:
    """[x, y, z, qw, qx, qy, qz], the pose layout of ManiSkill sensor configs and sapien.Pose."""
    x, y, z, w = quat_xyzw(T[:3, :3])
    return [float(v) for v in (*T[:3, 3], w, x, y, z)]


def from_sapien_pose_list(pose: list[float]) -> np.ndarray:
    p = np.asarray(pose, dtype=np.float64)
    return from_pos_quat_xyzw(p[:3], [p[4], p[5], p[6], p[3]])
