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

from calibration.io import MOUNTS, check_camera_distance
from calibration.transforms import inv_T, make_T, mean_pose, pose_difference
from policy_runtime.errors import UserError

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
DUPLICATE_MM, DUPLICATE_DEG = 0.05, 0.005  # two robot poses closer than this are the same pose recorded twice
MAX_OUTLIER_FRACTION = 0.25  # at most this share of the samples is named as outliers; more is a systematic fault


@dataclass(frozen=True)
class Gate:
    """The largest leave-one-out residual (and uncertainty) a calibration may have and still be written.

    Defaults: a board pose from a sharp 640x480 view is good to a few mm and a few tenths of a degree, and
    a robot's FK to about a millimetre; a sample 15 mm or 2 degrees off the others is a broken sample
    (wrong image, a pose read while the arm moved), not noise.
    """

    max_mm: float = 15.0
    max_deg: float = 2.0

    def ratio(self, mm: float, deg: float) -> float:
        """How far past the gate (1.0 = on it); a NaN residual (a diverged solve) counts as infinitely far."""
        r = max(mm / self.max_mm, deg / self.max_deg)
        return r if math.isfinite(r) else math.inf

    def __str__(self) -> str:
        return f"{self.max_mm:g} mm / {self.max_deg:g} deg (--max-residual-mm / --max-residual-deg)"


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
    residuals: np.ndarray  # [n, 2] leave-one-out residual of each sample (mm, deg), kept method
    notes: list[str] = field(default_factory=list)


def check_samples(base_T_gripper: list[np.ndarray], cam_T_target: list[np.ndarray],
                  labels: list[str] | None = None) -> None:
    """Refuse inputs from which no hand-eye transform can be identified, and the same pose given twice."""
    if len(base_T_gripper) != len(cam_T_target):
        raise UserError("need one board pose per robot pose")
    if len(base_T_gripper) < MIN_SAMPLES:
        raise UserError(f"{len(base_T_gripper)} usable samples; hand-eye calibration needs at least {MIN_SAMPLES} "
                        "(15 or more, rotated about different axes, give a reliable result)")
    labels = labels or [f"sample {i}" for i in range(len(base_T_gripper))]
    motions = []
    for (i, A), (j, B) in itertools.combinations(enumerate(base_T_gripper), 2):
        if np.linalg.norm(A[:3, 3] - B[:3, 3]) * 1000 < DUPLICATE_MM and \
                pose_difference(A, B)[1] < DUPLICATE_DEG:
            raise UserError(f"{labels[i]} and {labels[j]} have the same robot pose (a sample recorded twice?); "
                            "remove one: a repeated pose adds no motion and skews the fit")
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
    if not np.all(np.isfinite(R)):
        raise UserError("a hand-eye solve returned no finite rotation: the samples (or some subset of them, in the "
                        "leave-out refits) are too few or rotate too little; add samples rotated about more axes")
    U, _, Vt = np.linalg.svd(R)
    return U @ np.diag([1.0, 1.0, np.linalg.det(U @ Vt)]) @ Vt


def target_poses(base_T_gripper: list[np.ndarray], cam_T_target: list[np.ndarray], X: np.ndarray,
                 mount: str) -> list[np.ndarray]:
    """The board's pose in its fixed frame (base for eye-in-hand, gripper for eye-to-hand), once per sample."""
    if mount == "eye-in-hand":
        return [G @ X @ C for G, C in zip(base_T_gripper, cam_T_target, strict=True)]
    return [inv_T(G) @ X @ C for G, C in zip(base_T_gripper, cam_T_target, strict=True)]


def residuals_without(base_T_gripper: list[np.ndarray], cam_T_target: list[np.ndarray], mount: str, method: str,
                      i: int) -> np.ndarray:
    """[n, 2]: each sample's board pose against the others' mean (mm, deg), X solved without sample i."""
    keep = [j for j in range(len(base_T_gripper)) if j != i]
    X = solve([base_T_gripper[j] for j in keep], [cam_T_target[j] for j in keep], mount, method)
    poses = target_poses(base_T_gripper, cam_T_target, X, mount)
    ref = mean_pose([poses[j] for j in keep])
    return np.array([pose_difference(ref, T) for T in poses])


def loo_residuals(base_T_gripper: list[np.ndarray], cam_T_target: list[np.ndarray], mount: str,
                  method: str) -> np.ndarray:
    """[n, 2]: how far (mm, deg) each sample's board pose lies from the others' when X is solved without it.

    A sample paired with the wrong image (or a stale robot pose) pulls a fit that includes it, so its
    in-sample residual understates the fault; solved without it, X comes from the good samples and the
    bad one stands out by the full size of its error.
    """
    return np.array([residuals_without(base_T_gripper, cam_T_target, mount, method, i)[i]
                     for i in range(len(base_T_gripper))])


def find_outliers(base_T_gripper: list[np.ndarray], cam_T_target: list[np.ndarray], mount: str, method: str,
                  gate: Gate) -> list[int] | None:
    """The few samples whose removal leaves every other one within the gate; None when no few samples do.

    Greedy: drop the sample whose removal leaves the rest most consistent (a bad sample also spoils the
    fits it is part of, so the largest residual alone can point at a good one), until all fit.
    """
    keep, dropped = list(range(len(base_T_gripper))), []
    limit = max(1, int(MAX_OUTLIER_FRACTION * len(keep)))
    while len(dropped) < limit and len(keep) > MIN_SAMPLES + 1:
        G, C = [base_T_gripper[i] for i in keep], [cam_T_target[i] for i in keep]
        rest = []
        for i in range(len(keep)):
            r = np.delete(residuals_without(G, C, mount, method, i), i, axis=0)
            rest.append(max(gate.ratio(mm, deg) for mm, deg in r))
        dropped.append(keep.pop(int(np.argmin(rest))))
        if max(gate.ratio(mm, deg) for mm, deg in loo_residuals([base_T_gripper[i] for i in keep],
                                                                [cam_T_target[i] for i in keep],
                                                                mount, method)) <= 1.0:
            return sorted(dropped)
    return None


def check_consistency(base_T_gripper: list[np.ndarray], cam_T_target: list[np.ndarray], mount: str, method: str,
                      gate: Gate, labels: list[str]) -> np.ndarray:
    """Leave-one-out residuals of every sample; refuses, naming the culprits, when any is beyond the gate."""
    res = loo_residuals(base_T_gripper, cam_T_target, mount, method)
    if max(gate.ratio(mm, deg) for mm, deg in res) <= 1.0:
        return res
    outliers = find_outliers(base_T_gripper, cam_T_target, mount, method, gate)
    if outliers:
        named = "; ".join(f"{labels[i]} off by {res[i, 0]:.0f} mm / {res[i, 1]:.1f} deg" for i in outliers)
        many = len(outliers) > 1
        raise UserError(f"{len(outliers)} sample{'s' if many else ''} disagree{'' if many else 's'} with the others "
                        f"beyond the gate of {gate} (leave-one-out residual): {named}; paired with the wrong image or "
                        "read while the arm moved? remove from samples.json and run again")
    other = MOUNTS[1 - MOUNTS.index(mount)]
    worst = int(np.argmax([gate.ratio(mm, deg) for mm, deg in res]))
    what = (f"the samples do not fit one transform: {sum(gate.ratio(*r) > 1 for r in res)} of {len(res)} are beyond "
            f"the gate of {gate}, the worst {labels[worst]} by {res[worst, 0]:.0f} mm / {res[worst, 1]:.1f} deg")
    if max(gate.ratio(mm, deg) for mm, deg in loo_residuals(base_T_gripper, cam_T_target, other, method)) <= 1.0:
        raise UserError(f"{what}; solved as {other} they all fit: is --mount {other} the right mounting?")
    raise UserError(f"{what}; check --mount, the board's sizes and that each robot pose was read with its image")


def calibrate_handeye(base_T_gripper: list[np.ndarray], cam_T_target: list[np.ndarray], mount: str,
                      method: str = "TSAI", leave_out_k: int = 1, max_subsets: int = 50,
                      seed: int = 0, gate: Gate = Gate(), labels: list[str] | None = None) -> HandEyeResult:
    """Solve with every method, validate by chain consistency and leave-k-out, keep `method`'s result.

    Refused: a sample whose leave-one-out residual is beyond `gate` (named, with its residual), samples
    that fit no single transform (a wrong --mount is named when the other mounting fits), and a result
    whose uncertainty is beyond the gate or that puts the camera implausibly far away.

    Leave-k-out refits scatter less than X's actual error (each shares n - k samples with the full fit);
    the delete-k jackknife scales their RMS by sqrt((n - k) / k) into a standard error. The uncertainty,
    used to size camera randomisation, is the larger of that standard error and the largest deviation of
    another calibrateHandEye method from the kept X.
    """
    labels = labels or [f"sample {i}" for i in range(len(base_T_gripper))]
    check_samples(base_T_gripper, cam_T_target, labels)
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    n = len(base_T_gripper)
    if leave_out_k < 1 or n - leave_out_k < MIN_SAMPLES:
        raise UserError(f"leave-{leave_out_k}-out needs k >= 1 and at least {MIN_SAMPLES + leave_out_k} usable "
                        f"samples; there are {n}")
    residuals = check_consistency(base_T_gripper, cam_T_target, mount, method, gate, labels)
    results = {}
    for m in METHODS:
        X = solve(base_T_gripper, cam_T_target, mount, m)
        results[m] = MethodResult(m, X, Spread.of(target_poses(base_T_gripper, cam_T_target, X, mount)))
    X = results[method].X
    check_camera_distance(X[:3, 3], f"the {method} result ({'gripper' if mount == 'eye-in-hand' else 'base'}_T_cam)")
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
    unc_mm, unc_deg = max(jk_mm, others.translation_max_mm), max(jk_deg, others.rotation_max_deg)
    if gate.ratio(unc_mm, unc_deg) > 1.0:
        raise UserError(f"the result is uncertain by {unc_mm:.1f} mm / {unc_deg:.2f} deg (jackknife and method "
                        f"disagreement), beyond the gate of {gate}: add samples rotated further about more axes")
    return HandEyeResult(mount, method, X, results, leave_out, leave_out_k, jk_mm, jk_deg, unc_mm, unc_deg,
                         residuals, notes)
