"""Bad input to every `calibrate` command: exit 2, one line on stderr, no traceback, no file changed or added.

Each case runs the real CLI in a subprocess against real files: board views rendered by exact perspective
warps, a hand-eye sample set whose images match its robot poses, and broken variants of each file. Every
file under the case directory is hashed before and after, so a refused run that writes an output (or a
coverage image, or a temp file it leaves behind) fails its case.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.spatial.transform import Rotation

from calibration.io import CameraIntrinsics, Extrinsics, camera_yaml, extrinsics_yaml, write_yaml
from calibration.transforms import make_T
from tests.bad_input import assert_refused_unchanged
from tests.test_calibration import K_SYN, SPEC, board_views, write_handeye_set, write_views

BOARD = ["--squares", "7x5", "--square-mm", "30", "--marker-mm", "22", "--dict", "DICT_5X5_100"]
LONG = "n" * 300


def _edit_yaml(src: Path, dst: Path, **changes) -> Path:
    """A copy of a YAML file with top-level keys replaced (a value of None removes the key)."""
    d = yaml.safe_load(src.read_text())
    d.update(changes)
    d = {k: v for k, v in d.items() if v is not None}
    dst.write_text(yaml.safe_dump(d, sort_keys=False))
    return dst


def _edit_samples(src: Path, dst: Path, edit) -> Path:
    d = json.loads(src.read_text())
    edit(d)
    dst.write_text(json.dumps(d))
    return dst


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """One directory holding every input of the table: good files, broken files and earlier outputs."""
    r = tmp_path_factory.mktemp("bad_calibrate")
    write_views(r / "views", board_views(SPEC, 5))
    write_views(r / "other_views", board_views(SPEC, 5, seed=9))
    cam = write_yaml(r / "camera.yaml", camera_yaml(CameraIntrinsics(640, 480, K_SYN, np.zeros(5)), {}))
    (r / "camera_coverage.png").write_bytes(b"the accepted run's coverage image")
    T = make_T(Rotation.from_euler("xyz", [-140, 0, 90], degrees=True).as_matrix(), [1.0, 0.0, 0.6])
    ext = write_yaml(r / "ext.yaml", extrinsics_yaml(Extrinsics("panda_link0", "cam", T, "eye-to-hand", 1.0, 0.1),
                                                     {}))
    (r / "file.txt").write_text("a file where a directory is expected\n")
    (r / "binary.yaml").write_bytes(bytes(range(256)))
    (r / "exists_sim.png").write_bytes(b"an earlier sim view")
    (r / "dir.yaml").mkdir()

    bad = r / "bad"
    bad.mkdir()
    for name, changes in {
        "K_nan": {"camera_matrix": {"rows": 3, "cols": 3, "data": [float("nan"), 0, 320, 0, 600, 240, 0, 0, 1]}},
        "K_short": {"camera_matrix": {"rows": 3, "cols": 3, "data": [600, 0, 320, 0, 600, 240, 0, 0]}},
        "K_string": {"camera_matrix": "600 0 320 0 600 240 0 0 1"},
        "width_text": {"image_width": "wide"},
        "width_fraction": {"image_width": 640.5},
        "dist_inf": {"distortion_coefficients": {"rows": 1, "cols": 5, "data": [0, 0, 0, 0, float("inf")]}},
    }.items():
        _edit_yaml(cam, bad / f"cam_{name}.yaml", **changes)
    moved = {"matrix": None}  # the pose fields changed: drop the matrix, which would disagree with them
    for name, changes in {
        "far": {"translation": [100.0, 0.0, 0.0], **moved},
        "nan": {"translation": [float("nan"), 0.0, 0.6], **moved},
        "unc_negative": {"uncertainty": {"translation_mm": -1.0, "rotation_deg": 0.1}},
        "unc_huge": {"uncertainty": {"translation_mm": 453.0, "rotation_deg": 50.0}},
        "unc_text": {"uncertainty": "small"},
        "matrix_shape": {"matrix": [[1, 0, 0], [0, 1, 0]]},
        "quat_zero": {"quaternion_xyzw": [0, 0, 0, 0], **moved},
        "mount_typo": {"mount": "eye-to-head"},
        "frame_list": {"parent_frame": ["panda_link0"]},
    }.items():
        _edit_yaml(ext, bad / f"ext_{name}.yaml", **changes)

    he = write_handeye_set(r / "he")
    write_handeye_set(r / "stray", stray=3)
    for name, edit in {
        "version_text": lambda d: d.update(version="one"),
        "frames_text": lambda d: d.update(frames="panda_link0"),
        "robot_list": lambda d: d.update(robot=["panda"]),
        "board_text": lambda d: d.update(board="7x5 charuco"),
        "square_nan": lambda d: d["board"].update(square_mm=float("nan")),
        "image_list": lambda d: d["samples"][0].update(image=["000.png"]),
        "pose_nan": lambda d: d["samples"][1]["tcp_pose"][0].__setitem__(3, float("nan")),
        "joint_text": lambda d: d["samples"][2].pop("tcp_pose") and d["samples"][2].update(
            joint_positions={f"panda_joint{j}": "zero" for j in range(1, 8)}),
        "duplicate_pose": lambda d: d["samples"][5].update(tcp_pose=d["samples"][2]["tcp_pose"]),
        "duplicate_image": lambda d: d["samples"][5].update(image=d["samples"][2]["image"]),
        "mount_typo": lambda d: d.update(mount="eye-on-hand"),
        "cam_nan": lambda d: d.update(intrinsics="../bad/cam_K_nan.yaml"),
    }.items():
        _edit_samples(he, r / "he" / f"samples_{name}.json", edit)
    (r / "he" / "binary.json").write_bytes(bytes(range(256)))
    (r / "he" / "existing.yaml").write_text("an earlier extrinsics file\n")
    return r


def _i(*extra: str) -> list[str]:
    return ["intrinsics", "--images", "{r}/views", *BOARD, *extra]


def _h(samples: str, *extra: str, mount: str = "eye-in-hand") -> list[str]:
    return ["handeye", "--samples", f"{{r}}/he/{samples}", "--mount", mount, *extra]


def _s(intrinsics: str = "{r}/camera.yaml", extrinsics: str = "{r}/ext.yaml", *extra: str) -> list[str]:
    return ["sim-camera", "--intrinsics", intrinsics, "--extrinsics", extrinsics, *extra]


NEW_CAM = ["--out", "{r}/new.yaml"]
NEW_EXT = ["--out", "{r}/new_ext.yaml"]
NEW_SIM = ["--out", "{r}/new_sim.yaml"]

CASES = {
    # ---- intrinsics: options
    "intr-max-rms-nan": (_i("--max-rms", "nan", *NEW_CAM), "finite"),
    "intr-max-rms-negative": (_i("--max-rms", "-1", *NEW_CAM), "must be > 0"),
    "intr-max-rms-zero": (_i("--max-rms", "0", *NEW_CAM), "must be > 0"),
    "intr-square-nan": (_i("--square-mm", "nan", *NEW_CAM), "finite"),
    "intr-unknown-option": (_i("--bogus", *NEW_CAM), "unrecognized arguments"),
    # ---- intrinsics: inputs and outputs
    "intr-images-is-file": (["intrinsics", "--images", "{r}/file.txt", *NEW_CAM], "is a file, not a directory"),
    "intr-out-is-dir": (_i("--out", "{r}/dir.yaml"), "is a directory"),
    "intr-out-exists": (_i("--out", "{r}/camera.yaml"), "exists; pass --force"),
    "intr-out-under-file": (_i("--out", "{r}/file.txt/camera.yaml"), "is a file, not a directory"),
    "intr-out-name-too-long": (_i("--out", f"{{r}}/{LONG}.yaml"), "too long"),
    "intr-out-dir-name-too-long": (_i("--out", f"{{r}}/{LONG}/camera.yaml"), "name too long"),
    "intr-coverage-unwritable": (_i("--coverage", "/proc/calibrate_coverage.png", *NEW_CAM), "not writable"),
    "intr-coverage-suffix": (_i("--coverage", "{r}/coverage.txt", *NEW_CAM), "must end in one of"),
    "intr-coverage-in-images": (_i("--coverage", "{r}/views/cov.png", *NEW_CAM), "inside --images"),
    "intr-out-is-an-image": (_i("--out", "{r}/views/000.png", "--coverage", "{r}/cov.png", "--force"),
                             "also an input"),
    # a refused run (gate) must not touch the accepted run's coverage image, with or without --force
    "intr-gate-keeps-coverage": (["intrinsics", "--images", "{r}/other_views", *BOARD, "--max-rms", "0.0001",
                                  "--out", "{r}/refused.yaml", "--coverage", "{r}/camera_coverage.png"],
                                 "exists; pass --force"),
    "intr-gate-refused-with-force": (["intrinsics", "--images", "{r}/other_views", *BOARD, "--max-rms", "0.0001",
                                      "--out", "{r}/camera.yaml", "--force"], "above the gate of 0.0001 px"),
    # ---- handeye: samples.json of the wrong kind, types and shapes
    "he-samples-binary": (_h("binary.json", *NEW_EXT), "not a text"),
    "he-version-text": (_h("samples_version_text.json", *NEW_EXT), "version must be a number"),
    "he-frames-text": (_h("samples_frames_text.json", *NEW_EXT), "'frames' must be an object"),
    "he-robot-list": (_h("samples_robot_list.json", *NEW_EXT), "'robot' must be an object"),
    "he-board-text": (_h("samples_board_text.json", *NEW_EXT), "'board' must be an object"),
    "he-square-nan": (_h("samples_square_nan.json", *NEW_EXT), "finite"),
    "he-image-list": (_h("samples_image_list.json", *NEW_EXT), "needs an 'image' path"),
    "he-joint-text": (_h("samples_joint_text.json", *NEW_EXT), "must be a number"),
    "he-mount-typo": (_h("samples_mount_typo.json", *NEW_EXT), "mount must be one of"),
    "he-intrinsics-nan": (_h("samples_cam_nan.json", *NEW_EXT), "finite"),
    # ---- handeye: samples that are wrong together
    "he-duplicate-pose": (_h("samples_duplicate_pose.json", *NEW_EXT), "have the same robot pose"),
    "he-duplicate-image": (_h("samples_duplicate_image.json", *NEW_EXT), "both use image 002.png"),
    "he-wrong-image": (["handeye", "--samples", "{r}/stray/samples.json", "--mount", "eye-in-hand", *NEW_EXT],
                       "1 sample disagrees with the others beyond the gate of 15 mm / 2 deg (--max-residual-mm / "
                       "--max-residual-deg) (leave-one-out residual): sample 3 (stray.png) off by"),
    "he-wrong-mount": (_h("samples.json", *NEW_EXT, mount="eye-to-hand"), "is --mount eye-in-hand the right"),
    "he-gate-tiny": (_h("samples.json", "--max-residual-mm", "0.01", *NEW_EXT), "beyond the gate of 0.01 mm"),
    "he-gate-nan": (_h("samples.json", "--max-residual-mm", "nan", *NEW_EXT), "finite"),
    "he-gate-deg-negative": (_h("samples.json", "--max-residual-deg", "-2", *NEW_EXT), "must be > 0"),
    "he-leave-out-zero": (_h("samples.json", "--leave-out", "0", *NEW_EXT), "must be >= 1"),
    "he-out-exists": (_h("samples.json", "--out", "{r}/he/existing.yaml"), "exists; pass --force"),
    "he-out-is-samples": (_h("samples.json", "--out", "{r}/he/samples.json", "--force"), "also an input"),
    "he-out-unwritable": (_h("samples.json", "--out", "/proc/extrinsics.yaml"), "not writable"),
    # ---- sim-camera: intrinsics and extrinsics files
    "sim-intr-nan": (_s("{r}/bad/cam_K_nan.yaml", "{r}/ext.yaml", *NEW_SIM), "finite"),
    "sim-intr-short-matrix": (_s("{r}/bad/cam_K_short.yaml", "{r}/ext.yaml", *NEW_SIM), "has 8 numbers"),
    "sim-intr-matrix-text": (_s("{r}/bad/cam_K_string.yaml", "{r}/ext.yaml", *NEW_SIM), "must be a mapping"),
    "sim-intr-width-text": (_s("{r}/bad/cam_width_text.yaml", "{r}/ext.yaml", *NEW_SIM), "must be a number"),
    "sim-intr-width-fraction": (_s("{r}/bad/cam_width_fraction.yaml", "{r}/ext.yaml", *NEW_SIM), "whole number"),
    "sim-intr-dist-inf": (_s("{r}/bad/cam_dist_inf.yaml", "{r}/ext.yaml", *NEW_SIM), "finite"),
    "sim-intr-binary": (_s("{r}/binary.yaml", "{r}/ext.yaml", *NEW_SIM), "not a text"),
    "sim-ext-100m": (_s("{r}/camera.yaml", "{r}/bad/ext_far.yaml", *NEW_SIM), "100.0 m from its parent"),
    "sim-ext-nan": (_s("{r}/camera.yaml", "{r}/bad/ext_nan.yaml", *NEW_SIM), "finite"),
    "sim-ext-negative-uncertainty": (_s("{r}/camera.yaml", "{r}/bad/ext_unc_negative.yaml", *NEW_SIM), ">= 0"),
    "sim-ext-huge-uncertainty": (_s("{r}/camera.yaml", "{r}/bad/ext_unc_huge.yaml", *NEW_SIM),
                                 "randomisation range would be +/-1359.0 mm"),
    "sim-ext-uncertainty-text": (_s("{r}/camera.yaml", "{r}/bad/ext_unc_text.yaml", *NEW_SIM), "must be a mapping"),
    "sim-ext-matrix-shape": (_s("{r}/camera.yaml", "{r}/bad/ext_matrix_shape.yaml", *NEW_SIM), "shape"),
    "sim-ext-quat-zero": (_s("{r}/camera.yaml", "{r}/bad/ext_quat_zero.yaml", *NEW_SIM), "unit quaternion"),
    "sim-ext-mount-typo": (_s("{r}/camera.yaml", "{r}/bad/ext_mount_typo.yaml", *NEW_SIM), "mount must be"),
    "sim-ext-frame-list": (_s("{r}/camera.yaml", "{r}/bad/ext_frame_list.yaml", *NEW_SIM), "non-empty strings"),
    # ---- sim-camera: options and outputs
    "sim-dr-min-negative": (_s("{r}/camera.yaml", "{r}/ext.yaml", "--dr-min-mm", "-1", *NEW_SIM), "must be >= 0"),
    "sim-dr-scale-nan": (_s("{r}/camera.yaml", "{r}/ext.yaml", "--dr-scale", "nan", *NEW_SIM), "finite"),
    "sim-dr-deg-huge": (_s("{r}/camera.yaml", "{r}/ext.yaml", "--dr-min-deg", "150", *NEW_SIM), "must be <= 10"),
    "sim-image-size-zero": (_s("{r}/camera.yaml", "{r}/ext.yaml", "--image-size", "0", *NEW_SIM), ">= 16"),
    "sim-seed-negative": (_s("{r}/camera.yaml", "{r}/ext.yaml", "--seed", "-3", *NEW_SIM), ">= 0"),
    "sim-edge-tol-inf": (_s("{r}/camera.yaml", "{r}/ext.yaml", "--edge-tol", "inf", *NEW_SIM), "finite"),
    "sim-real-image-is-dir": (_s("{r}/camera.yaml", "{r}/ext.yaml", "--real-image", "{r}/views", *NEW_SIM),
                              "is not a file"),
    "sim-real-image-missing": (_s("{r}/camera.yaml", "{r}/ext.yaml", "--real-image", "{r}/none.png", *NEW_SIM),
                               "does not exist"),
    "sim-out-is-input": (_s("{r}/camera.yaml", "{r}/ext.yaml", "--out", "{r}/camera.yaml", "--force"),
                         "also an input"),
    "sim-view-exists": (_s("{r}/camera.yaml", "{r}/ext.yaml", "--out", "{r}/exists.yaml"), "exists_sim.png exists"),
    # ---- board
    "board-px-zero": (["board", "--px-per-square", "0", "--out", "{r}/b.png"], ">= 10"),
    "board-suffix": (["board", "--out", "{r}/board.txt"], "must end in one of"),
    "board-out-exists": (["board", "--out", "{r}/camera_coverage.png"], "exists; pass --force"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_calibrate_refuses_bad_input(root, case):
    args, contains = CASES[case]
    paths = sorted(root.rglob("*"))
    line = assert_refused_unchanged("calibrate", [a.replace("{r}", str(root)) for a in args], [root],
                                    contains=contains)
    assert line.startswith("calibrate"), line
    assert sorted(root.rglob("*")) == paths  # no folder created either
