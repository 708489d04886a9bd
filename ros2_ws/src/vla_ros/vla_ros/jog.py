"""Teleop jogging without ROS: joint steps, and Cartesian TCP steps through damped least squares on the FK.

The Jacobian is taken numerically from the same URDF forward kinematics the safety filter checks the
workspace with, so a Cartesian jog and the workspace box agree on where the TCP is.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def joint_jog(target: dict[str, float], joint: str, delta: float) -> dict[str, float]:
    if joint not in target:
        raise KeyError(f"unknown joint {joint!r}")
    out = dict(target)
    out[joint] += delta
    return out


def cartesian_jog(target: dict[str, float], joints: tuple[str, ...], dxyz: np.ndarray,
                  fk: Callable[[dict[str, float]], np.ndarray], damping: float = 1e-2, eps: float = 1e-5
                  ) -> dict[str, float]:
    """Move the TCP by dxyz (base frame, metres), keeping the orientation change small: one DLS step."""
    q = np.array([target[j] for j in joints])

    def pose(qv: np.ndarray) -> np.ndarray:
        T = fk({**target, **dict(zip(joints, qv, strict=True))})
        return np.concatenate([T[:3, 3], T[:3, :3].reshape(-1)])

    p0 = pose(q)
    J = np.stack([(pose(q + eps * np.eye(len(q))[i]) - p0) / eps for i in range(len(q))], axis=1)
    err = np.concatenate([np.asarray(dxyz, float), np.zeros(9)])  # keep the rotation matrix still
    w = np.concatenate([np.ones(3), 0.1 * np.ones(9)])            # position matters most
    Jw = J * w[:, None]
    dq = Jw.T @ np.linalg.solve(Jw @ Jw.T + damping**2 * np.eye(len(err)), err * w)
    return {**target, **{j: float(v) for j, v in zip(joints, q + dq, strict=True)}}
