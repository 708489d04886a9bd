"""The calibration files: camera YAML (ROS camera_info layout) and extrinsics YAML (a static transform).

Both are plain YAML that ROS tools read as they are; what the calibration measured (errors, spreads,
the board used) sits under a `calibration` key that those tools ignore.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibration.checks import integer, number
from calibration.transforms import from_pos_quat_xyzw, make_T, quat_xyzw
from policy_runtime.artifacts import atomic_write_text
from policy_runtime.errors import UserError
from policy_runtime.yaml_io import dump_yaml, load_yaml_mapping

MOUNTS = ("eye-in-hand", "eye-to-hand")
MAX_CAMERA_DISTANCE_M = 5.0  # farther than this from the robot, a pose is in mm or the calibration is broken
MAX_IMAGE_SIDE = 16384
MAX_FOCAL_PER_PX = 100.0  # fx above 100 x the image width is a field of view under 0.6 deg: not a robot camera
DISTORTION_LENGTHS = (4, 5, 8, 12, 14)


@dataclass
class CameraIntrinsics:
    """One camera's calibration as ROS camera_info holds it; R and P default to a monocular camera's."""

    width: int
    height: int
    K: np.ndarray
    dist: np.ndarray
    name: str = "camera"
    R: np.ndarray | None = None  # 3x3 rectification; None: identity
    P: np.ndarray | None = None  # 3x4 projection; None: [K | 0] (rectified images keep K)
    distortion_model: str = ""  # "": plumb_bob for up to 5 coefficients, rational_polynomial beyond

    def __post_init__(self) -> None:
        if self.R is None:
            self.R = np.eye(3)
        if self.P is None:
            self.P = np.hstack([np.asarray(self.K, dtype=np.float64), np.zeros((3, 1))])
        if not self.distortion_model:
            self.distortion_model = "plumb_bob" if len(self.dist) <= 5 else "rational_polynomial"


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


def write_yaml(path: str | Path, data: dict) -> Path:
    """Write a YAML file atomically (the commands themselves go through calibration.outputs)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(p, dump_yaml(data))


def _key(d: dict, key: str, where: str):
    if key not in d:
        raise UserError(f"{where} lacks '{key}'")
    return d[key]


def _numbers(value, shape: tuple[int, ...] | None, what: str) -> np.ndarray:
    """A nested list of finite numbers, of the given shape (any length when None)."""
    try:
        a = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a list of numbers, got {str(value)[:60]}") from None
    if any(isinstance(v, bool | str) for v in np.ravel(np.array(value, dtype=object))):
        raise UserError(f"{what} must be a list of numbers, got {str(value)[:60]}")
    if (shape is not None and a.shape != shape) or (shape is None and a.ndim != 1):
        raise UserError(f"{what} must have shape {shape or '(n,)'}, got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise UserError(f"{what} must be finite, got {a.tolist()}")
    return a


def _ros_matrix(d: dict, key: str, rows: int | None, cols: int | None, where: str) -> np.ndarray:
    """A camera_info matrix {rows, cols, data}; rows/cols None accept what the file states."""
    m = _key(d, key, where)
    if not isinstance(m, dict):
        raise UserError(f"{where}: {key} must be a mapping with rows, cols and data")
    data = _numbers(_key(m, "data", f"{where}: {key}"), None, f"{where}: {key}.data")
    r = rows if rows is not None else integer(m.get("rows", 1), f"{where}: {key}.rows", low=1, high=1)
    c = cols if cols is not None else len(data)
    if data.size != r * c:
        raise UserError(f"{where}: {key}.data has {data.size} numbers; a {r}x{c} matrix needs {r * c}")
    return data.reshape(r, c)


def read_camera_yaml(path: str | Path) -> CameraIntrinsics:
    """A camera_info YAML (as `calibrate intrinsics` writes it), every number checked (finite, positive, in the image).

    The camera node publishes what it reads here; rectification and projection matrices are optional.
    """
    where = f"camera file {path}"
    d = load_yaml_mapping(path, "camera file")
    if "camera_matrix" not in d:
        raise UserError(f"{where} is not a camera_info YAML (from `calibrate intrinsics`): it lacks 'camera_matrix'")
    w = integer(_key(d, "image_width", where), f"{where}: image_width", low=1, high=MAX_IMAGE_SIDE)
    h = integer(_key(d, "image_height", where), f"{where}: image_height", low=1, high=MAX_IMAGE_SIDE)
    K = _ros_matrix(d, "camera_matrix", 3, 3, where)
    dist = _ros_matrix(d, "distortion_coefficients", None, None, where).reshape(-1)
    if len(dist) not in DISTORTION_LENGTHS:
        raise UserError(f"{where}: {len(dist)} distortion coefficients; OpenCV models have "
                        f"{', '.join(map(str, DISTORTION_LENGTHS))}")
    if not (0 < K[0, 0] <= MAX_FOCAL_PER_PX * w and 0 < K[1, 1] <= MAX_FOCAL_PER_PX * h):
        raise UserError(f"{where}: focal lengths fx {K[0, 0]:g}, fy {K[1, 1]:g} px must be positive and at most "
                        f"{MAX_FOCAL_PER_PX} x the image size")
    if not (0 <= K[0, 2] <= w and 0 <= K[1, 2] <= h):
        raise UserError(f"{where}: principal point ({K[0, 2]:g}, {K[1, 2]:g}) lies outside the {w}x{h} image")
    if not np.allclose(K[1:, 0], 0) or not np.allclose(K[2], [0, 0, 1]):
        raise UserError(f"{where}: camera_matrix must be [fx, s, cx, 0, fy, cy, 0, 0, 1]")
    name = d.get("camera_name", "camera")
    model = d.get("distortion_model", "")
    if not isinstance(name, str) or not isinstance(model, str):
        raise UserError(f"{where}: camera_name and distortion_model must be strings")
    R = _ros_matrix(d, "rectification_matrix", 3, 3, where) if "rectification_matrix" in d else None
    P = _ros_matrix(d, "projection_matrix", 3, 4, where) if "projection_matrix" in d else None
    return CameraIntrinsics(w, h, K, dist, name, R, P, model)


def camera_yaml(cam: CameraIntrinsics, report: dict | None = None) -> dict:
    """ROS camera_info YAML, with what the calibration measured under `calibration` when there is a report.

    A fresh calibration has P = [K | 0]: rectified images keep K (undistort with newCameraMatrix=K).
    """
    data = {
        "image_width": int(cam.width),
        "image_height": int(cam.height),
        "camera_name": cam.name,
        "camera_matrix": _matrix(3, 3, cam.K),
        "distortion_model": cam.distortion_model,
        "distortion_coefficients": _matrix(1, len(cam.dist), cam.dist),
        "rectification_matrix": _matrix(3, 3, cam.R),
        "projection_matrix": _matrix(3, 4, cam.P),
    }
    if report is not None:
        data["calibration"] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                               **report}
    return data


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
    """The extrinsics YAML from `calibrate handeye`, with every field checked (types, finite, a plausible place)."""
    where = f"extrinsics file {path}"
    d = load_yaml_mapping(path, "extrinsics file")
    if "quaternion_xyzw" not in d or "translation" not in d:
        raise UserError(f"{where} is not an extrinsics YAML (from `calibrate handeye`): it lacks 'translation' or "
                        "'quaternion_xyzw'")
    frames = [_key(d, k, where) for k in ("parent_frame", "child_frame")]
    if not all(isinstance(f, str) and f for f in frames):
        raise UserError(f"{where}: parent_frame and child_frame must be non-empty strings")
    mount = _key(d, "mount", where)
    if mount not in MOUNTS:
        raise UserError(f"{where}: mount must be one of {', '.join(MOUNTS)}, got {mount!r}")
    t = _numbers(d["translation"], (3,), f"{where}: translation")
    q = _numbers(d["quaternion_xyzw"], (4,), f"{where}: quaternion_xyzw")
    if abs(np.linalg.norm(q) - 1) > 1e-3:
        raise UserError(f"{where}: quaternion_xyzw must be a unit quaternion, its norm is {np.linalg.norm(q):g}")
    check_camera_distance(t, where)
    T = from_pos_quat_xyzw(t, q)
    if "matrix" in d and not np.allclose(_numbers(d["matrix"], (4, 4), f"{where}: matrix"), T, atol=1e-6):
        raise UserError(f"{where}: translation/quaternion and matrix disagree (edited by hand?)")
    unc = d.get("uncertainty", {})
    if not isinstance(unc, dict):
        raise UserError(f"{where}: uncertainty must be a mapping with translation_mm and rotation_deg")
    unc_mm = number(unc.get("translation_mm", 0.0), f"{where}: uncertainty.translation_mm", low=0)
    unc_deg = number(unc.get("rotation_deg", 0.0), f"{where}: uncertainty.rotation_deg", low=0, high=180)
    return Extrinsics(frames[0], frames[1], T, mount, unc_mm, unc_deg)


def check_camera_distance(t: np.ndarray, where: str) -> None:
    """A camera more than MAX_CAMERA_DISTANCE_M from its parent frame is a unit mistake or a broken calibration."""
    dist = float(np.linalg.norm(t))
    if not math.isfinite(dist):
        raise UserError(f"{where}: the camera position is not finite ({t.tolist()})")
    if dist > MAX_CAMERA_DISTANCE_M:
        raise UserError(f"{where}: the camera is {dist:.1f} m from its parent frame (at most "
                        f"{MAX_CAMERA_DISTANCE_M:g} m is plausible; translations are in metres, not mm)")


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
    if np.linalg.norm(T[:3, 3]) > MAX_CAMERA_DISTANCE_M:
        raise UserError(f"{what} translation is {np.linalg.norm(T[:3, 3]):.1f} away from the base: give metres, not mm")
    return make_T(R, T[:3, 3])
