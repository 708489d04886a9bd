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
from calibration.intrinsics import read_image
from calibration.io import CameraIntrinsics, homogeneous, read_camera_yaml
from calibration.kinematics import PANDA_BASE_LINK, PANDA_TCP_LINK, Chain, maniskill_panda_urdf
from policy_runtime.errors import UserError

MAX_PNP_RMS = 2.0  # px; a board pose fitting worse than this is a bad detection, not a measurement
FORMAT_VERSION = 1


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


@dataclass
class Measurements:
    base_T_gripper: list[np.ndarray] = field(default_factory=list)
    cam_T_board: list[np.ndarray] = field(default_factory=list)
    used: list[str] = field(default_factory=list)
    pnp_rms: list[float] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def load_samples(path: str | Path) -> SampleSet:
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except OSError as e:
        raise UserError(f"cannot read samples file {p}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"samples file {p} is not valid JSON: {e}") from None
    if not isinstance(d, dict) or not isinstance(d.get("samples"), list):
        raise UserError(f"samples file {p} must be an object with a 'samples' list (see docs/calibration.md)")
    if int(d.get("version", FORMAT_VERSION)) != FORMAT_VERSION:
        raise UserError(f"samples file {p} has version {d.get('version')}; "
                        f"this calibrate reads version {FORMAT_VERSION}")
    for key in ("board", "intrinsics"):
        if key not in d:
            raise UserError(f"samples file {p} lacks '{key}' (see docs/calibration.md)")
    root = p.resolve().parent
    robot = d.get("robot") or {}
    base_link = str(robot.get("base_link", PANDA_BASE_LINK))
    tip_link = str(robot.get("tip_link", PANDA_TCP_LINK))
    frames = d.get("frames") or {}
    chain = None
    images, poses = [], []
    for i, s in enumerate(d["samples"]):
        if not isinstance(s, dict) or "image" not in s:
            raise UserError(f"sample {i} in {p.name} needs an 'image' path")
        if ("tcp_pose" in s) == ("joint_positions" in s):
            raise UserError(f"sample {i} in {p.name} needs exactly one of 'tcp_pose' and 'joint_positions'")
        if "tcp_pose" in s:
            poses.append(homogeneous(s["tcp_pose"], f"sample {i} tcp_pose"))
        else:
            if chain is None:
                chain = Chain(root / robot["urdf"] if robot.get("urdf") else maniskill_panda_urdf(), base_link,
                              tip_link)
            q = s["joint_positions"]
            if not isinstance(q, dict):
                raise UserError(f"sample {i} joint_positions must map joint names to radians")
            poses.append(chain.forward(q))
        images.append(root / str(s["image"]))
    return SampleSet(root, BoardSpec.from_dict(d["board"]), read_camera_yaml(root / str(d["intrinsics"])),
                     d.get("mount"), str(frames.get("base", base_link)), str(frames.get("gripper", tip_link)),
                     str(frames.get("camera", "camera_color_optical_frame")), images, poses)


def measure(samples: SampleSet) -> Measurements:
    """Board pose in every image; samples without a usable board are skipped, with the reason kept."""
    detector = BoardDetector(samples.board)
    K, dist = samples.intrinsics.K, samples.intrinsics.dist
    out, unusable = Measurements(), []
    for path, G in zip(samples.images, samples.gripper_poses, strict=True):
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
        out.pnp_rms.append(rms)
    if not out.used and unusable:
        raise UserError(f"no usable board in any of {len(samples.images)} sample images: "
                        f"{detector.diagnose(unusable[:5])}")
    return out
