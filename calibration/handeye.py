"""Hand-eye calibration with the mounting convention enforced, every OpenCV method, and validation.

Conventions (OpenCV calib3d): `base_T_gripper` is the forward-kinematics pose, `cam_T_target` the board
pose from solvePnP. The unknown X is gripper_T_cam (eye-in-hand: camera on the flange, board fixed) or
base_T_cam (eye-to-hand: camera fixed, board held by the gripper). For eye-to-hand the inverted FK pose
goes into OpenCV's `gripper2base` slot; callers never do that themselves.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy.spatial.transform import Rotation

from calibration.transforms import inv_T, make_T, mean_pose, pose_difference
from policy_runtime.errors import UserError

MOUNTS = ("eye-in-hand", "eye-to-hand")
HAND_EYE_METHODS = {
    "TSAI": cv2.CALIB_HAND_EYE_TSAI,
    "PARK": cv2.CALIB_HAND_EYE_PARK,
    "HORAUD": cv2.CALIB_HAND_EYE_HORAUD,
    "ANDREFF": cv2.CALIB_HAND_EYE_ANDREFF,
    "DANIILIDIS": cv2.CALIB_HAND_EYE_DANIILIDIS,
}
ROBOT_WORLD_METHODS = {"SHAH": cv2.CALIB_ROBOT_WORLD_HAND_EYE_SHAH, "LI": cv2.CALIB_ROBOT_WORLD_HAND_EYE_LI}
METHODS = (*HAND_EYE_METHODS, *ROBOT_WORLD_METHODS)
MIN_SAMPLES = 3  # two motions with non-parallel rotation axes (OpenCV's stated minimum)
MIN_MOTION_DEG = 5.0  # a relative rotation smaller than this carries no usable axis
MIN_AXIS_SPREAD = 0.1  # second / first singular value of the motion axes; below it the axes are all parallel


@dataclass
class Spread:
    """How far a set of poses of one frame scatter around their mean (or around a reference pose)."""

    translation_rms_mm: float
    translation_max_mm: float
    rotation_rms_deg: float
    rotation_max_deg: float

    @classmethod
    def of(cls, poses: list[np.ndarray], reference: np.ndarray | None = None) -> Spread:
        ref = mean_pose(poses) if reference is None else reference
        d = np.array([pose_difference(ref, T) for T in poses]).reshape(-1, 2)
        return cls(float(np.sqrt(np.mean(d[:, 0] ** 2))), float(d[:, 0].max()),
                   float(np.sqrt(np.mean(d[:, 1] ** 2))), float(d[:, 1].max()))

    def to_dict(self) -> dict:
        return {k: round(v, 4) for k, v in self.__dict__.items()}


@dataclass
class MethodResult:
    method: str
    X: np.ndarray  # gripper_T_cam (eye-in-hand) or base_T_cam (eye-to-hand)
    consistency: Spread  # spread of the board pose implied by each sample through X


@dataclass
class HandEyeResult:
    mount: str
    method: str
    X: np.ndarray
    methods: dict[str, MethodResult]
    leave_out: Spread  # refits leaving k samples out, around X
    leave_out_k: int
    jackknife_mm: float  # delete-k jackknife standard error of X's translation
    jackknife_deg: float  # ... and of its rotation
    uncertainty_mm: float
    uncertainty_deg: float
    notes: list[str] = field(default_factory=list)


def check_samples(base_T_gripper: list[np.ndarray], cam_T_target: list[np.ndarray]) -> None:
    """Refuse inputs from which no hand-eye transform can be identified."""
    if len(base_T_gripper) != len(cam_T_target):
        raise UserError("need one board pose per robot pose")
    if len(base_T_gripper) < MIN_SAMPLES:
        raise UserError(f"{len(base_T_gripper)} usable samples; hand-eye calibration needs at least {MIN_SAMPLES} "
                        "(15 or more, rotated about different axes, give a reliable result)")
    motions = []
    for A, B in itertools.combinations(base_T_gripper, 2):
        rotvec = Rotation.from_matrix(A[:3, :3].T @ B[:3, :3]).as_rotvec()
        if np.degrees(np.linalg.norm(rotvec)) >= MIN_MOTION_DEG:
            motions.append(rotvec / np.linalg.norm(rotvec))
    if len(motions) < 2:
        raise UserError(f"degenerate rotations: the gripper rotates less than {MIN_MOTION_DEG:g} deg between samples; "
                        "rotate it about at least two different axes")
    s = np.linalg.svd(np.array(motions), compute_uv=False)
    if s[1] / s[0] < MIN_AXIS_SPREAD:
        raise UserError("degenerate rotations: every motion between samples rotates about the same axis, which leaves "
                        "the camera position along it undetermined; rotate the gripper about two or more axes")


def solve(base_T_gripper: list[np.ndarray], cam_T_target: list[np.ndarray], mount: str, method: str) -> np.ndarray:
    """X for one method: gripper_T_cam (eye-in-hand) or base_T_cam (eye-to-hand)."""
    if mount not in MOUNTS:
        raise UserError(f"unknown mount {mount!r}; use eye-in-hand or eye-to-hand")
    robot = base_T_gripper if mount == "eye-in-hand" else [inv_T(T) for T in base_T_gripper]
    Rt = [T[:3, :3] for T in cam_T_target], [T[:3, 3] for T in cam_T_target]
    if method in HAND_EYE_METHODS:
        R, t = cv2.calibrateHandEye([T[:3, :3] for T in robot], [T[:3, 3] for T in robot], *Rt,
                                    method=HAND_EYE_METHODS[method])
        return make_T(_nearest_rotation(R), t)
    if method in ROBOT_WORLD_METHODS:
        # cam_T_target = Z * inv(robot_i) * W: Z is cam_T_gripper (eye-in-hand) or cam_T_base (eye-to-hand).
        inv_robot = [inv_T(T) for T in robot]
        _, _, Rz, tz = cv2.calibrateRobotWorldHandEye(*Rt, [T[:3, :3] for T in inv_robot],
                                                      [T[:3, 3] for T in inv_robot], method=ROBOT_WORLD_METHODS[method])
        return inv_T(make_T(_nearest_rotation(Rz), tz))
    raise UserError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def _nearest_rotation(R: np.ndarray) -> np.ndarray:
    """Closest proper rotation: on inconsistent data some methods return a matrix that is not one."""
    U, _, Vt = np.linalg.svd(R)
    return U @ np.diag([1.0, 1.0, np.linalg.det(U @ Vt)]) @ Vt


def target_poses(base_T_gripper: list[np.ndarray], cam_T_target: list[np.ndarray], X: np.ndarray,
                 mount: str) -> list[np.ndarray]:
    """The board's pose in its fixed frame (base for eye-in-hand, gripper for eye-to-hand), once per sample."""
    if mount == "eye-in-hand":
        return [G @ X @ C for G, C in zip(base_T_gripper, cam_T_target, strict=True)]
    return [inv_T(G) @ X @ C for G, C in zip(base_T_gripper, cam_T_target, strict=True)]


def calibrate_handeye(base_T_gripper: list[np.ndarray], cam_T_target: list[np.ndarray], mount: str,
                      method: str = "TSAI", leave_out_k: int = 1, max_subsets: int = 50,
                      seed: int = 0) -> HandEyeResult:
    """Solve with every method, validate by chain consistency and leave-k-out, keep `method`'s result.

    Leave-k-out refits scatter less than X's actual error (each shares n - k samples with the full fit);
    the delete-k jackknife scales their RMS by sqrt((n - k) / k) into a standard error. The uncertainty,
    used to size camera randomisation, is the larger of that standard error and the largest deviation of
    another calibrateHandEye method from the kept X.
    """
    check_samples(base_T_gripper, cam_T_target)
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    n = len(base_T_gripper)
    if leave_out_k < 1 or n - leave_out_k < MIN_SAMPLES:
        raise UserError(f"leave-{leave_out_k}-out needs k >= 1 and at least {MIN_SAMPLES + leave_out_k} usable "
                        f"samples; there are {n}")
    results = {}
    for m in METHODS:
        X = solve(base_T_gripper, cam_T_target, mount, m)
        results[m] = MethodResult(m, X, Spread.of(target_poses(base_T_gripper, cam_T_target, X, mount)))
    X = results[method].X
    if math.comb(n, leave_out_k) <= max_subsets:
        subsets = list(itertools.combinations(range(n), leave_out_k))
    else:
        rng = np.random.default_rng(seed)
        subsets = [tuple(rng.choice(n, leave_out_k, replace=False)) for _ in range(max_subsets)]
    refits = []
    for out in subsets:
        keep = [i for i in range(n) if i not in out]
        refits.append(solve([base_T_gripper[i] for i in keep], [cam_T_target[i] for i in keep], mount, method))
    leave_out = Spread.of(refits, reference=X)
    jk = np.sqrt((n - leave_out_k) / leave_out_k)
    jk_mm, jk_deg = float(jk * leave_out.translation_rms_mm), float(jk * leave_out.rotation_rms_deg)
    others = Spread.of([r.X for m, r in results.items() if m in HAND_EYE_METHODS], reference=X)
    notes = []
    if others.translation_max_mm > 5.0:
        notes.append(f"the hand-eye methods disagree by up to {others.translation_max_mm:.1f} mm: the samples are "
                     "noisy or too few (add samples with larger rotations)")
    return HandEyeResult(mount, method, X, results, leave_out, leave_out_k, jk_mm, jk_deg,
                         max(jk_mm, others.translation_max_mm), max(jk_deg, others.rotation_max_deg), notes)
