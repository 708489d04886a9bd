"""Read and write ROS camera_info YAML (the camera_calibration_parsers format), without ROS."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml


class CameraInfoError(ValueError):
    """A calibration file that is not valid camera_info YAML; the message names the field."""


@dataclass(frozen=True)
class CameraCalibration:
    width: int
    height: int
    name: str
    K: np.ndarray   # 3x3
    D: np.ndarray   # distortion coefficients
    R: np.ndarray   # 3x3 rectification
    P: np.ndarray   # 3x4 projection
    distortion_model: str


def _matrix(data: dict, key: str, shape: tuple[int, int] | None) -> np.ndarray:
    m = data.get(key)
    if not isinstance(m, dict) or "data" not in m:
        raise CameraInfoError(f"camera_info: `{key}` must be a mapping with rows, cols and data")
    try:
        arr = np.asarray(m["data"], dtype=float)
        rows, cols = int(m.get("rows", 1)), int(m.get("cols", arr.size))
    except (TypeError, ValueError):
        raise CameraInfoError(f"camera_info: `{key}` has non-numeric values") from None
    if arr.size != rows * cols or (shape is not None and (rows, cols) != shape):
        raise CameraInfoError(f"camera_info: `{key}` is {rows}x{cols} with {arr.size} values"
                              + (f", expected {shape[0]}x{shape[1]}" if shape else ""))
    return arr.reshape(rows, cols) if shape is not None else arr.reshape(-1)


def load_camera_info(path: str | Path) -> CameraCalibration:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CameraInfoError(f"cannot read camera_info {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise CameraInfoError(f"camera_info {path} is not a mapping")
    for key in ("image_width", "image_height"):
        if not isinstance(data.get(key), int) or data[key] <= 0:
            raise CameraInfoError(f"camera_info {path}: `{key}` must be a positive integer")
    K = _matrix(data, "camera_matrix", (3, 3))
    return CameraCalibration(data["image_width"], data["image_height"], str(data.get("camera_name", "camera")), K,
                             _matrix(data, "distortion_coefficients", None),
                             _matrix(data, "rectification_matrix", (3, 3)) if "rectification_matrix" in data
                             else np.eye(3),
                             _matrix(data, "projection_matrix", (3, 4)) if "projection_matrix" in data
                             else np.hstack([K, np.zeros((3, 1))]),
                             str(data.get("distortion_model", "plumb_bob")))


def dump_camera_info(cal: CameraCalibration) -> str:
    def m(a: np.ndarray, rows: int, cols: int) -> dict:
        return {"rows": rows, "cols": cols, "data": [float(x) for x in np.asarray(a).reshape(-1)]}

    return yaml.safe_dump({"image_width": cal.width, "image_height": cal.height, "camera_name": cal.name,
                           "camera_matrix": m(cal.K, 3, 3), "distortion_model": cal.distortion_model,
                           "distortion_coefficients": m(cal.D, 1, len(cal.D)),
                           "rectification_matrix": m(cal.R, 3, 3), "projection_matrix": m(cal.P, 3, 4)},
                          sort_keys=False)
