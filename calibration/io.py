"""The calibration files: camera YAML (ROS camera_info layout) and extrinsics YAML (a static transform).

Both are plain YAML that ROS tools read as they are; what the calibration measured (errors, spreads,
the board used) sits under a `calibration` key that those tools ignore.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from calibration.transforms import from_pos_quat_xyzw, make_T, quat_xyzw
from policy_runtime.errors import UserError


@dataclass
class CameraIntrinsics:
    width: int
    height: int
    K: np.ndarray
    dist: np.ndarray
    name: str = "camera"


@dataclass
class Extrinsics:
    parent_frame: str
    child_frame: str
    T: np.ndarray  # parent_T_child
    mount: str
    uncertainty_mm: float
    uncertainty_deg: float


def _matrix(rows: int, cols: int, values) -> dict:
    return {"rows": rows, "cols": cols, "data": [float(v) for v in np.asarray(values).reshape(-1)]}


def load_yaml(path: str | Path, what: str) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{what} {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} must be a YAML mapping")
    return data


def write_yaml(path: str | Path, data: dict) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=160))
    return p


def camera_yaml(cam: CameraIntrinsics, report: dict) -> dict:
    """ROS camera_info YAML. P = [K | 0]: rectified images keep K (undistort with newCameraMatrix=K)."""
    return {
        "image_width": int(cam.width),
        "image_height": int(cam.height),
        "camera_name": cam.name,
        "camera_matrix": _matrix(3, 3, cam.K),
        "distortion_model": "plumb_bob" if len(cam.dist) <= 5 else "rational_polynomial",
        "distortion_coefficients": _matrix(1, len(cam.dist), cam.dist),
        "rectification_matrix": _matrix(3, 3, np.eye(3)),
        "projection_matrix": _matrix(3, 4, np.hstack([cam.K, np.zeros((3, 1))])),
        "calibration": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        **report},
    }


def read_camera_yaml(path: str | Path) -> CameraIntrinsics:
    d = load_yaml(path, "camera file")
    try:
        K = np.array(d["camera_matrix"]["data"], dtype=np.float64).reshape(3, 3)
        dist = np.array(d["distortion_coefficients"]["data"], dtype=np.float64).reshape(-1)
        cam = CameraIntrinsics(int(d["image_width"]), int(d["image_height"]), K, dist, str(d.get("camera_name", "")))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"camera file {path} is not a camera_info YAML (from `calibrate intrinsics`): {e!r}") from None
    if K[0, 0] <= 0 or K[1, 1] <= 0 or cam.width <= 0 or cam.height <= 0:
        raise UserError(f"camera file {path} has a non-positive focal length or image size")
    return cam


def extrinsics_yaml(ext: Extrinsics, report: dict) -> dict:
    """A static transform: the arguments of `static_transform_publisher` plus the 4x4 matrix."""
    return {
        "parent_frame": ext.parent_frame,
        "child_frame": ext.child_frame,
        "translation": [float(v) for v in ext.T[:3, 3]],
        "quaternion_xyzw": [float(v) for v in quat_xyzw(ext.T[:3, :3])],
        "matrix": [[float(v) for v in row] for row in ext.T],
        "mount": ext.mount,
        "uncertainty": {"translation_mm": round(float(ext.uncertainty_mm), 4),
                        "rotation_deg": round(float(ext.uncertainty_deg), 4)},
        "calibration": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        **report},
    }


def read_extrinsics_yaml(path: str | Path) -> Extrinsics:
    d = load_yaml(path, "extrinsics file")
    try:
        T = from_pos_quat_xyzw(d["translation"], d["quaternion_xyzw"])
        unc = d.get("uncertainty") or {}
        ext = Extrinsics(str(d["parent_frame"]), str(d["child_frame"]), T, str(d["mount"]),
                         float(unc.get("translation_mm", 0.0)), float(unc.get("rotation_deg", 0.0)))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"extrinsics file {path} is not an extrinsics YAML (from `calibrate handeye`): {e!r}") \
            from None
    if "matrix" in d and not np.allclose(np.asarray(d["matrix"], dtype=np.float64), T, atol=1e-6):
        raise UserError(f"extrinsics file {path}: translation/quaternion and matrix disagree (edited by hand?)")
    return ext


def homogeneous(value, what: str) -> np.ndarray:
    """A 4x4 rigid transform from nested lists, refusing non-rigid or millimetre-scaled input."""
    try:
        T = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a 4x4 matrix of numbers") from None
    if T.shape != (4, 4) or not np.all(np.isfinite(T)):
        raise UserError(f"{what} must be a finite 4x4 matrix, got shape {T.shape}")
    R = T[:3, :3]
    if not np.allclose(R.T @ R, np.eye(3), atol=1e-4) or np.linalg.det(R) < 0 or not np.allclose(T[3], [0, 0, 0, 1]):
        raise UserError(f"{what} is not a rigid transform (its rotation must be orthonormal, last row 0 0 0 1)")
    if np.linalg.norm(T[:3, 3]) > 5.0:
        raise UserError(f"{what} translation is {np.linalg.norm(T[:3, 3]):.1f} away from the base: give metres, not mm")
    return make_T(R, T[:3, 3])
