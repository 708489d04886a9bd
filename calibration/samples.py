"""samples.json: robot poses paired with board images, turned into (base_T_gripper, cam_T_board) pairs.

The format is documented in docs/calibration.md; the ROS 2 capture node writes it. Each sample gives
the gripper pose either directly (`tcp_pose`, 4x4 base->gripper in metres) or as `joint_positions`
(radians by joint name), which go through the URDF chain (ManiSkill's Panda unless `robot.urdf` is set).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calibration.boards import BoardDetector, BoardSpec, estimate_board_pose
from calibration.checks import integer, number
from calibration.intrinsics import read_image
from calibration.io import MOUNTS, CameraIntrinsics, homogeneous, read_camera_yaml
from calibration.kinematics import PANDA_BASE_LINK, PANDA_TCP_LINK, Chain, maniskill_panda_urdf
from policy_runtime.errors import UserError

MAX_PNP_RMS = 2.0  # px; a board pose fitting worse than this is a bad detection, not a measurement
FORMAT_VERSION = 1
MAX_JOINT_RAD = 4 * np.pi  # a joint position beyond two turns is in degrees (or garbage), not radians


@dataclass
class SampleSet:
    root: Path  # directory of samples.json; image and intrinsics paths are relative to it
    board: BoardSpec
    intrinsics: CameraIntrinsics
    mount: str | None
    base_frame: str
    gripper_frame: str
    camera_frame: str
    images: list[Path]
    gripper_poses: list[np.ndarray]  # base_T_gripper per sample (from tcp_pose or forward kinematics)
    labels: list[str]  # "sample <index in the file> (<image path as given>)", for messages
    intrinsics_path: Path


@dataclass
class Measurements:
    base_T_gripper: list[np.ndarray] = field(default_factory=list)
    cam_T_board: list[np.ndarray] = field(default_factory=list)
    used: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)  # of the used samples, as SampleSet.labels
    pnp_rms: list[float] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def _read_json(p: Path) -> dict:
    try:
        d = json.loads(p.read_text())
    except OSError as e:
        raise UserError(f"cannot read samples file {p}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"samples file {p} is not a text (JSON) file") from None
    except json.JSONDecodeError as e:
        raise UserError(f"samples file {p} is not valid JSON: {e}") from None
    if not isinstance(d, dict) or not isinstance(d.get("samples"), list):
        raise UserError(f"samples file {p} must be an object with a 'samples' list (see docs/calibration.md)")
    return d


def _mapping(d: dict, key: str, where: str) -> dict:
    value = d.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{where}: '{key}' must be an object, got {type(value).__name__}")
    return value


def _string(d: dict, key: str, default: str | None, where: str) -> str:
    value = d.get(key, default)
    if not isinstance(value, str) or not value:
        raise UserError(f"{where}: '{key}' must be a non-empty string, got {value!r}")
    return value


def load_samples(path: str | Path) -> SampleSet:
    """samples.json with every field's type, shape and number checked (one UserError naming the field)."""
    p = Path(path)
    d = _read_json(p)
    where = f"samples file {p}"
    version = integer(d.get("version", FORMAT_VERSION), f"{where}: version")
    if version != FORMAT_VERSION:
        raise UserError(f"{where} has version {version}; this calibrate reads version {FORMAT_VERSION}")
    for key in ("board", "intrinsics"):
        if key not in d:
            raise UserError(f"{where} lacks '{key}' (see docs/calibration.md)")
    mount = d.get("mount")
    if mount is not None and mount not in MOUNTS:
        raise UserError(f"{where}: mount must be one of {', '.join(MOUNTS)}, got {mount!r}")
    if not isinstance(d["board"], dict):
        raise UserError(f"{where}: 'board' must be an object (squares, square_mm, marker_mm, dictionary)")
    board = BoardSpec.from_dict(d["board"])
    root = p.resolve().parent
    robot = _mapping(d, "robot", where)
    base_link = _string(robot, "base_link", PANDA_BASE_LINK, f"{where}: robot")
    tip_link = _string(robot, "tip_link", PANDA_TCP_LINK, f"{where}: robot")
    urdf = root / _string(robot, "urdf", None, f"{where}: robot") if robot.get("urdf") is not None else None
    frames = _mapping(d, "frames", where)
    frame_names = [_string(frames, k, default, f"{where}: frames") for k, default in
                   (("base", base_link), ("gripper", tip_link), ("camera", "camera_color_optical_frame"))]
    intrinsics_path = root / _string(d, "intrinsics", None, where)
    chain = None
    images, poses, labels, seen = [], [], [], {}
    for i, s in enumerate(d["samples"]):
        if not isinstance(s, dict) or not isinstance(s.get("image"), str) or not s["image"]:
            raise UserError(f"sample {i} in {p.name} needs an 'image' path (a string)")
        if ("tcp_pose" in s) == ("joint_positions" in s):
            raise UserError(f"sample {i} in {p.name} needs exactly one of 'tcp_pose' and 'joint_positions'")
        image = root / s["image"]
        if image.resolve() in seen:
            raise UserError(f"samples {seen[image.resolve()]} and {i} in {p.name} both use image {s['image']}; "
                            "each robot pose needs its own image")
        seen[image.resolve()] = i
        if "tcp_pose" in s:
            poses.append(homogeneous(s["tcp_pose"], f"sample {i} tcp_pose"))
        else:
            if chain is None:
                chain = Chain(urdf or maniskill_panda_urdf(), base_link, tip_link)
            poses.append(chain.forward(_joint_positions(s["joint_positions"], i)))
        images.append(image)
        labels.append(f"sample {i} ({s['image']})")
    return SampleSet(root, board, read_camera_yaml(intrinsics_path), mount, *frame_names, images, poses, labels,
                     intrinsics_path)


def _joint_positions(q, i: int) -> dict[str, float]:
    if not isinstance(q, dict):
        raise UserError(f"sample {i} joint_positions must map joint names to radians")
    return {str(name): number(v, f"sample {i} joint_positions.{name} (radians)", low=-MAX_JOINT_RAD,
                              high=MAX_JOINT_RAD) for name, v in q.items()}


def measure(samples: SampleSet) -> Measurements:
    """Board pose in every image; samples without a usable board are skipped, with the reason kept."""
    detector = BoardDetector(samples.board)
    K, dist = samples.intrinsics.K, samples.intrinsics.dist
    out, unusable = Measurements(), []
    for path, G, label in zip(samples.images, samples.gripper_poses, samples.labels, strict=True):
        img = read_image(path)
        if (img.shape[1], img.shape[0]) != (samples.intrinsics.width, samples.intrinsics.height):
            raise UserError(f"{path.name} is {img.shape[1]}x{img.shape[0]} but the intrinsics are for "
                            f"{samples.intrinsics.width}x{samples.intrinsics.height}")
        det = detector.detect(img)
        if not detector.usable(det):
            out.skipped[path.name] = f"no usable board ({len(det.ids)} corners)"
            unusable.append(img)
            continue
        T, rms = estimate_board_pose(detector, det, K, dist)
        if rms > MAX_PNP_RMS:
            out.skipped[path.name] = f"board pose fits badly ({rms:.2f} px RMS)"
            continue
        out.base_T_gripper.append(G)
        out.cam_T_board.append(T)
        out.used.append(path.name)
        out.labels.append(label)
        out.pnp_rms.append(rms)
    if not out.used and unusable:
        raise UserError(f"no usable board in any of {len(samples.images)} sample images: "
                        f"{detector.diagnose(unusable[:5])}")
    return out
