"""Calibration without the simulator: synthetic hand-eye poses, synthetic board views, files and the CLI.

Board views here are exact pinhole projections of the board image (a homography K [r1 r2 t] per view),
used for the error paths; the accuracy of the whole chain on rendered images is in test_calibration_sim.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from calibration.alignment import edge_fscore
from calibration.boards import BoardDetector, BoardSpec, board_image
from calibration.handeye import HAND_EYE_METHODS, METHODS, MOUNTS, Gate, calibrate_handeye, solve
from calibration.intrinsics import calibrate_intrinsics, check_rms_gate, list_images
from calibration.io import (
    CameraIntrinsics,
    Extrinsics,
    camera_yaml,
    extrinsics_yaml,
    read_camera_yaml,
    read_extrinsics_yaml,
    write_yaml,
)
from calibration.samples import load_samples
from calibration.sim_camera import rescale_intrinsics
from calibration.transforms import (
    cv_camera_to_sapien,
    from_sapien_pose_list,
    inv_T,
    make_T,
    pose_difference,
    sapien_camera_to_cv,
    to_sapien_pose_list,
)
from policy_runtime.errors import UserError

K_SYN = np.array([[600.0, 0, 320], [0, 600, 240], [0, 0, 1]])
SPEC = BoardSpec(7, 5, 0.03, 0.022, "DICT_5X5_100")
X_EYE_IN_HAND = make_T(Rotation.from_euler("xyz", [5, -8, 90], degrees=True).as_matrix(), [0.05, -0.03, 0.04])


def rot(rng: np.random.Generator, deg: float) -> np.ndarray:
    return Rotation.from_rotvec(rng.normal(size=3) * np.radians(deg)).as_matrix()


def random_board_pose(rng: np.random.Generator, spec: BoardSpec) -> np.ndarray:
    """cam_T_board of a board tilted up to 30 deg about each axis, its centre 0.35-0.5 m in front of the camera."""
    R = Rotation.from_euler("xyz", rng.uniform(-30, 30, 3), degrees=True).as_matrix()
    c = np.array([rng.uniform(-0.05, 0.05), rng.uniform(-0.04, 0.04), rng.uniform(0.35, 0.5)])
    W, H = spec.columns * spec.square_m, spec.rows * spec.square_m
    return make_T(R, c - R @ np.array([W / 2, H / 2, 0]))


def render_board(spec: BoardSpec, cam_T_board: np.ndarray, px: int = 80) -> np.ndarray:
    """The board seen by K_SYN at cam_T_board (an exact perspective warp of the board image, 640x480)."""
    img = board_image(spec, px, margin_px=px // 2)
    s = spec.square_m / px
    A = np.array([[s, 0, -s * px / 2], [0, s, -s * px / 2], [0, 0, 1]])  # board image px -> board metres
    R, t = cam_T_board[:3, :3], cam_T_board[:3, 3]
    Hm = K_SYN @ np.column_stack([R[:, 0], R[:, 1], t]) @ A
    return cv2.warpPerspective(img, Hm, (640, 480), flags=cv2.INTER_AREA, borderValue=255)


def board_views(spec: BoardSpec, n: int, seed: int = 0, px: int = 80) -> list[np.ndarray]:
    """n images of the board seen by K_SYN from tilted poses 0.35-0.5 m away (exact perspective warps)."""
    rng = np.random.default_rng(seed)
    return [render_board(spec, random_board_pose(rng, spec), px) for _ in range(n)]


def write_handeye_set(directory: Path, n: int = 8, seed: int = 0, stray: int | None = None) -> Path:
    """An eye-in-hand samples.json with real board images: the camera on the gripper, the board on the table.

    Each sample's board pose is drawn first and the gripper pose follows from the true X, so every image
    shows the board. With `stray`, that sample's image is replaced by one taken from another pose (the
    robot pose paired with the wrong image).
    """
    rng = np.random.default_rng(seed)
    X = X_EYE_IN_HAND
    W = make_T(Rotation.from_euler("x", 180, degrees=True).as_matrix(), [0.5, 0.1, 0.0])  # base_T_board
    samples = []
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        C = random_board_pose(rng, SPEC)
        name = f"{i:03d}.png"
        if i == stray:
            C, name = random_board_pose(rng, SPEC), "stray.png"
            G = W @ inv_T(random_board_pose(rng, SPEC)) @ inv_T(X)
        else:
            G = W @ inv_T(C) @ inv_T(X)
        cv2.imwrite(str(directory / name), render_board(SPEC, C))
        samples.append({"image": name, "tcp_pose": G.tolist()})
    return write_samples(directory, samples)


def write_views(directory: Path, images: list[np.ndarray]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        cv2.imwrite(str(directory / f"{i:03d}.png"), im)
    return directory


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "calibration.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("calibrate: error:") and fragment in lines[0], proc.stderr


# ---------------------------------------------------------------- transforms


def test_opencv_sapien_axes():
    """A camera looking along world +x: SAPIEN forward is +x, OpenCV z is +x, OpenCV y (down) is world -z."""
    T_sapien = make_T(np.eye(3), [1, 2, 3])
    T_cv = sapien_camera_to_cv(T_sapien)
    np.testing.assert_allclose(T_cv[:3, 2], [1, 0, 0])
    np.testing.assert_allclose(T_cv[:3, 1], [0, 0, -1])
    np.testing.assert_allclose(T_cv[:3, 0], [0, -1, 0])
    rng = np.random.default_rng(0)
    T = make_T(rot(rng, 90), rng.normal(size=3))
    np.testing.assert_allclose(sapien_camera_to_cv(cv_camera_to_sapien(T)), T, atol=1e-12)
    np.testing.assert_allclose(from_sapien_pose_list(to_sapien_pose_list(T)), T, atol=1e-12)


def test_rescale_intrinsics_maps_pixel_centres():
    K = np.array([[500.0, 0, 319.5], [0, 480, 239.5], [0, 0, 1]])
    K2 = rescale_intrinsics(K, (640, 480), (64, 64))
    np.testing.assert_allclose(K2[:2, 2], [31.5, 31.5])  # the image centre stays the centre
    np.testing.assert_allclose([K2[0, 0], K2[1, 1]], [50.0, 64.0])


# ---------------------------------------------------------------- hand-eye on synthetic poses


def synthetic_handeye(mount: str, n: int = 20, t_noise_m: float = 3e-4, r_noise_deg: float = 0.05, seed: int = 0):
    """Robot poses over a 0.3 m box with +-30 deg tilts, board poses through the true X plus PnP-like noise."""
    rng = np.random.default_rng(seed)
    down = Rotation.from_euler("x", 180, degrees=True).as_matrix()
    G = [make_T(down @ rot(rng, 20), [0.45, 0.0, 0.35] + rng.uniform(-0.15, 0.15, 3)) for _ in range(n)]
    if mount == "eye-in-hand":
        X = make_T(rot(rng, 10), [0.05, -0.03, 0.04])  # gripper_T_cam
        W = make_T(down, [0.5, 0.05, 0.0])  # base_T_board
        C = [inv_T(g @ X) @ W for g in G]
    else:
        X = make_T(Rotation.from_euler("xyz", [-140, 0, 90], degrees=True).as_matrix(), [1.2, 0.1, 0.6])  # base_T_cam
        W = make_T(rot(rng, 10), [0.0, -0.05, 0.08])  # gripper_T_board
        C = [inv_T(X) @ g @ W for g in G]
    C = [make_T(c[:3, :3] @ rot(rng, r_noise_deg), c[:3, 3] + rng.normal(size=3) * t_noise_m) for c in C]
    return G, C, X


@pytest.mark.parametrize("mount", MOUNTS)
def test_handeye_recovers_synthetic_transform(mount):
    G, C, X = synthetic_handeye(mount)
    res = calibrate_handeye(G, C, mount)
    for name in METHODS:
        dmm, ddeg = pose_difference(res.methods[name].X, X)
        assert dmm < 2.0 and ddeg < 0.2, (name, dmm, ddeg)
    assert res.method == "TSAI" and np.array_equal(res.X, res.methods["TSAI"].X)
    # the consistency spread reflects the injected noise (0.3 mm per axis), not a broken chain
    assert res.methods["TSAI"].consistency.translation_rms_mm < 3.0
    assert 0 < res.uncertainty_mm < 3.0 and 0 < res.uncertainty_deg < 0.3


def test_wrong_mounting_convention_is_refused_by_consistency():
    """Eye-to-hand data solved as eye-in-hand fits no single X: refused, and the message names the right mount."""
    G, C, _ = synthetic_handeye("eye-to-hand")
    calibrate_handeye(G, C, "eye-to-hand")
    with pytest.raises(UserError, match="solved as eye-to-hand they all fit: is --mount eye-to-hand"):
        calibrate_handeye(G, C, "eye-in-hand")


@pytest.mark.parametrize("mount", MOUNTS)
def test_leave_one_out_names_the_sample_with_the_wrong_board_pose(mount):
    """One sample's board pose taken from another sample (its image swapped): refused, naming only that sample.

    Before the gate these were written with only a warning, the result 20-700 mm off.
    """
    G, C, X = synthetic_handeye(mount, n=12)
    for k, j in ((0, 5), (4, 9), (11, 2)):
        bad = list(C)
        bad[k] = C[j]
        with pytest.raises(UserError, match=f"^1 sample disagrees .*: sample {k} off by [0-9]+ mm") as e:
            calibrate_handeye(G, bad, mount)
        assert str(e.value).count(" off by ") == 1, e.value
        wide_open = calibrate_handeye(G, bad, mount, gate=Gate(1e4, 180))  # what used to be written
        assert pose_difference(wide_open.X, X)[0] > 10


def test_leave_one_out_names_two_bad_samples():
    G, C, _ = synthetic_handeye("eye-to-hand", n=14)
    bad = list(C)
    bad[2], bad[7] = C[9], C[3]
    with pytest.raises(UserError, match="^2 samples disagree .*: sample 2 off by .*; sample 7 off by"):
        calibrate_handeye(G, bad, "eye-to-hand")


def test_consistency_gate_refuses_noisy_samples_and_is_settable():
    """Board poses 8 mm / 1.5 deg noisy fit no transform within the default gate; a clean set fails a tiny gate."""
    G, C, _ = synthetic_handeye("eye-in-hand", n=15, t_noise_m=8e-3, r_noise_deg=1.5)
    with pytest.raises(UserError, match="beyond the gate of 15 mm / 2 deg"):
        calibrate_handeye(G, C, "eye-in-hand")
    G, C, _ = synthetic_handeye("eye-in-hand", n=15)
    res = calibrate_handeye(G, C, "eye-in-hand")
    assert res.residuals.shape == (15, 2) and res.residuals[:, 0].max() < 3.0
    with pytest.raises(UserError, match="beyond the gate of 0.1 mm / 0.01 deg"):
        calibrate_handeye(G, C, "eye-in-hand", gate=Gate(0.1, 0.01))


def test_handeye_refuses_the_same_pose_twice():
    """A repeated robot pose adds no motion: before, it went through and inflated the uncertainty to 160 mm."""
    G, C, _ = synthetic_handeye("eye-in-hand", n=10)
    with pytest.raises(UserError, match="sample 0 and sample 10 have the same robot pose"):
        calibrate_handeye([*G, G[0]], [*C, C[0]], "eye-in-hand")


def test_handeye_refuses_too_few_samples():
    G, C, _ = synthetic_handeye("eye-in-hand", n=2)
    with pytest.raises(UserError, match="at least 3"):
        calibrate_handeye(G, C, "eye-in-hand")


def test_handeye_refuses_rotations_about_one_axis():
    rng = np.random.default_rng(1)
    G = [make_T(Rotation.from_euler("z", a, degrees=True).as_matrix(), rng.uniform(-0.2, 0.2, 3))
         for a in (0, 20, 45, 70, 95)]
    C = [make_T(rot(rng, 30), rng.uniform(-0.2, 0.2, 3)) for _ in G]
    with pytest.raises(UserError, match="same axis"):
        calibrate_handeye(G, C, "eye-in-hand")
    G = [make_T(np.eye(3), rng.uniform(-0.2, 0.2, 3)) for _ in range(5)]
    with pytest.raises(UserError, match="degenerate rotations"):
        calibrate_handeye(G, C, "eye-in-hand")


def test_handeye_unknown_method_and_mount():
    G, C, _ = synthetic_handeye("eye-in-hand")
    with pytest.raises(UserError, match="unknown method"):
        calibrate_handeye(G, C, "eye-in-hand", method="MAGIC")
    with pytest.raises(UserError, match="unknown mount"):
        solve(G, C, "eye-on-head", "TSAI")


# ---------------------------------------------------------------- intrinsics error paths on synthetic views


def test_synthetic_views_calibrate(tmp_path):
    res = calibrate_intrinsics(list_images(write_views(tmp_path, board_views(SPEC, 8))), SPEC)
    assert res.rms < 0.5 and len(res.per_view) == 8
    assert abs(res.K[0, 0] / 600 - 1) < 0.01 and abs(res.K[1, 1] / 600 - 1) < 0.01
    with pytest.raises(UserError, match="above the gate of 0.01 px"):
        check_rms_gate(res, 0.01)


def test_too_few_views(tmp_path):
    with pytest.raises(UserError, match="only 2 of 2 images .* at least 4"):
        calibrate_intrinsics(list_images(write_views(tmp_path, board_views(SPEC, 2))), SPEC)


def test_no_board(tmp_path):
    blank = [np.full((480, 640, 3), v, np.uint8) for v in (40, 128, 220)]
    with pytest.raises(UserError, match="no ArUco markers found"):
        calibrate_intrinsics(list_images(write_views(tmp_path, blank)), SPEC)


def test_wrong_dictionary_names_the_right_one(tmp_path):
    other = BoardSpec(7, 5, 0.03, 0.022, "DICT_4X4_50")
    with pytest.raises(UserError, match="use --dict DICT_4X4_50"):
        calibrate_intrinsics(list_images(write_views(tmp_path, board_views(other, 4))), SPEC)


@pytest.mark.parametrize("printed_legacy", [True, False])
def test_legacy_pattern_mismatch_hint(tmp_path, printed_legacy):
    """Even row counts differ between layouts: markers are found, corners are not, and the hint says why."""
    printed = BoardSpec(6, 4, 0.03, 0.022, "DICT_4X4_50", legacy_pattern=printed_legacy)
    assumed = BoardSpec(6, 4, 0.03, 0.022, "DICT_4X4_50", legacy_pattern=not printed_legacy)
    fix = "add --legacy-pattern" if printed_legacy else "remove --legacy-pattern"
    with pytest.raises(UserError, match=fix):
        calibrate_intrinsics(list_images(write_views(tmp_path, board_views(printed, 4))), assumed)


def test_board_spec_errors():
    with pytest.raises(UserError, match="smaller than the square"):
        BoardDetector(BoardSpec(7, 5, 0.03, 0.04))
    with pytest.raises(UserError, match="more than DICT_4X4_50 holds"):
        BoardDetector(BoardSpec(12, 12, 0.03, 0.02, "DICT_4X4_50"))
    with pytest.raises(UserError, match="unknown ArUco dictionary"):
        BoardDetector(BoardSpec(7, 5, 0.03, 0.02, "DICT_7X7_7"))


# ---------------------------------------------------------------- files


def test_camera_and_extrinsics_yaml_round_trip(tmp_path):
    cam = CameraIntrinsics(640, 480, K_SYN, np.array([0.1, -0.2, 0.001, 0.002, 0.05]), "wrist")
    write_yaml(tmp_path / "cam.yaml", camera_yaml(cam, {"rms_px": 0.2}))
    back = read_camera_yaml(tmp_path / "cam.yaml")
    np.testing.assert_allclose(back.K, cam.K)
    np.testing.assert_allclose(back.dist, cam.dist)
    assert (back.width, back.height, back.name) == (640, 480, "wrist")
    rng = np.random.default_rng(3)
    T = make_T(rot(rng, 60), [0.9, -0.2, 0.5])
    write_yaml(tmp_path / "ext.yaml", extrinsics_yaml(Extrinsics("panda_link0", "cam", T, "eye-to-hand", 1.5, 0.1),
                                                      {}))
    ext = read_extrinsics_yaml(tmp_path / "ext.yaml")
    np.testing.assert_allclose(ext.T, T, atol=1e-12)
    assert (ext.parent_frame, ext.mount, ext.uncertainty_mm) == ("panda_link0", "eye-to-hand", 1.5)


def write_samples(tmp_path: Path, samples: list, **extra) -> Path:
    write_yaml(tmp_path / "cam.yaml", camera_yaml(CameraIntrinsics(640, 480, K_SYN, np.zeros(5)), {}))
    doc = {"version": 1, "intrinsics": "cam.yaml",
           "board": {"type": "charuco", "squares": "7x5", "square_mm": 30, "marker_mm": 22,
                     "dictionary": "DICT_5X5_100"}, "samples": samples, **extra}
    (tmp_path / "samples.json").write_text(json.dumps(doc))
    return tmp_path / "samples.json"


@pytest.mark.parametrize("sample, fragment", [
    ({"image": "a.png"}, "exactly one of 'tcp_pose' and 'joint_positions'"),
    ({"image": "a.png", "tcp_pose": np.eye(3).tolist()}, "4x4"),
    ({"image": "a.png", "tcp_pose": [[1, 0, 0, 400], [0, 1, 0, 0], [0, 0, 1, 300], [0, 0, 0, 1]]}, "not mm"),
    ({"image": "a.png", "tcp_pose": [[2, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]}, "not a rigid"),
    ({"image": "a.png", "joint_positions": {"panda_joint1": 0.0}}, "lacks panda_joint2"),
])
def test_samples_json_errors(tmp_path, sample, fragment):
    with pytest.raises(UserError, match=fragment):
        load_samples(write_samples(tmp_path, [sample]))


# ---------------------------------------------------------------- alignment score


def test_edge_fscore_drops_with_misalignment():
    img = np.zeros((240, 320, 3), np.uint8)
    cv2.rectangle(img, (60, 50), (200, 170), (200, 200, 200), -1)
    cv2.circle(img, (250, 120), 30, (90, 160, 230), -1)
    assert edge_fscore(img, img)["edge_fscore"] == 1.0
    shifted = np.roll(img, 6, axis=1)
    assert edge_fscore(img, shifted)["edge_fscore"] < 0.5
    assert edge_fscore(img, np.zeros_like(img))["edge_fscore"] == 0.0


# ---------------------------------------------------------------- CLI


def test_cli_help_lists_subcommands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for cmd in ("intrinsics", "handeye", "sim-camera", "board"):
        assert cmd in proc.stdout


def test_cli_intrinsics_writes_camera_info_yaml_and_coverage(tmp_path):
    images = write_views(tmp_path / "imgs", board_views(SPEC, 6))
    proc = run_cli("intrinsics", "--images", images, "--board", "charuco", "--squares", "7x5", "--square-mm", "30",
                   "--marker-mm", "22", "--dict", "DICT_5X5_100", "--out", tmp_path / "camera.yaml")
    assert proc.returncode == 0, proc.stderr
    import yaml

    d = yaml.safe_load((tmp_path / "camera.yaml").read_text())
    for key in ("image_width", "image_height", "camera_name", "camera_matrix", "distortion_model",
                "distortion_coefficients", "rectification_matrix", "projection_matrix"):
        assert key in d
    assert d["camera_matrix"]["rows"] == 3 and len(d["projection_matrix"]["data"]) == 12
    assert len(d["calibration"]["views"]) == 6 and d["calibration"]["rms_px"] < 0.5
    assert cv2.imread(str(tmp_path / "camera_coverage.png")).shape == (480, 640, 3)


def test_cli_bad_inputs_one_line_no_traceback(tmp_path):
    imgs = write_views(tmp_path / "two", board_views(SPEC, 2))
    assert_one_line_error(run_cli("intrinsics", "--images", imgs, "--out", tmp_path / "c.yaml"), "at least 4")
    assert_one_line_error(run_cli("intrinsics", "--images", tmp_path / "none", "--out", tmp_path / "c.yaml"),
                          "does not exist")
    assert_one_line_error(run_cli("intrinsics", "--images", imgs, "--squares", "7by5", "--out", tmp_path / "c.yaml"),
                          "COLUMNSxROWS")
    assert_one_line_error(run_cli("handeye", "--samples", tmp_path / "no.json", "--mount", "eye-to-hand", "--out",
                                  tmp_path / "e.yaml"), "cannot read samples file")
    (tmp_path / "bad.yaml").write_text("image_width: 640\n")
    assert_one_line_error(run_cli("sim-camera", "--intrinsics", tmp_path / "bad.yaml", "--extrinsics",
                                  tmp_path / "bad.yaml", "--out", tmp_path / "s.yaml"), "not a camera_info YAML")


def test_cli_sim_camera_bad_inputs(tmp_path):
    cam = write_yaml(tmp_path / "cam.yaml", camera_yaml(CameraIntrinsics(640, 480, K_SYN, np.zeros(5)), {}))
    T = make_T(Rotation.from_euler("xyz", [-140, 0, 90], degrees=True).as_matrix(), [1.0, 0.0, 0.6])
    for mount in MOUNTS:
        write_yaml(tmp_path / f"{mount}.yaml", extrinsics_yaml(Extrinsics("a", "b", T, mount, 1.0, 0.1), {}))
    assert_one_line_error(run_cli("sim-camera", "--intrinsics", cam, "--extrinsics", tmp_path / "eye-in-hand.yaml",
                                  "--out", tmp_path / "s.yaml"), "places a fixed camera")
    assert_one_line_error(run_cli("sim-camera", "--intrinsics", cam, "--extrinsics", tmp_path / "eye-to-hand.yaml",
                                  "--task", "FlyToMars-v1", "--out", tmp_path / "s.yaml"), "cannot make task")


def test_cli_handeye_degenerate_samples(tmp_path):
    """Samples rotating about one axis only: refused with one line naming the problem."""
    images = board_views(SPEC, 4, seed=5)
    samples = []
    for i, im in enumerate(images):
        cv2.imwrite(str(tmp_path / f"{i}.png"), im)
        pose = make_T(Rotation.from_euler("z", 25 * i, degrees=True).as_matrix(), [0.4, 0.0, 0.3 + 0.01 * i])
        samples.append({"image": f"{i}.png", "tcp_pose": pose.tolist()})
    proc = run_cli("handeye", "--samples", write_samples(tmp_path, samples), "--mount", "eye-in-hand", "--out",
                   tmp_path / "e.yaml")
    assert_one_line_error(proc, "same axis")


def test_cli_handeye_writes_residuals_and_replaces_only_with_force(tmp_path):
    """Consistent samples with real images: accepted within the gate, the residuals reported, X recovered;
    a second run into the same --out is refused unless --force is given."""
    import yaml

    samples = write_handeye_set(tmp_path)
    out = tmp_path / "extrinsics.yaml"
    args = ("handeye", "--samples", samples, "--mount", "eye-in-hand", "--out", out)
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert "largest leave-one-out residual" in proc.stdout
    d = yaml.safe_load(out.read_text())
    assert max(d["calibration"]["residuals"]["loo_mm"]) < 2.0 and d["calibration"]["residuals"]["gate_mm"] == 15.0
    dmm, ddeg = pose_difference(np.array(d["matrix"]), X_EYE_IN_HAND)
    assert dmm < 2.0 and ddeg < 0.3, (dmm, ddeg)
    before = out.read_bytes()
    assert_one_line_error(run_cli(*args), "exists; pass --force")
    assert out.read_bytes() == before
    assert run_cli(*args, "--force").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp file left


def test_output_that_appears_during_the_run_is_not_replaced(tmp_path):
    """Two runs into one output: the one finishing second is refused at the final rename, not silently lost."""
    from calibration.outputs import check_outputs, write_new

    out = tmp_path / "extrinsics.yaml"
    check_outputs([out], force=False)  # this run's check passes ...
    out.write_text("the other run's result\n")  # ... then another run writes the same output first
    with pytest.raises(UserError, match="created by another process while this run worked"):
        write_new(out, b"this run's result\n", force=False)
    assert out.read_text() == "the other run's result\n" and [p.name for p in tmp_path.iterdir()] == [out.name]
    write_new(out, b"this run's result\n", force=True)
    assert out.read_text() == "this run's result\n"


def test_methods_table_covers_opencv():
    assert set(HAND_EYE_METHODS) == {"TSAI", "PARK", "HORAUD", "ANDREFF", "DANIILIDIS"}
    assert set(METHODS) - set(HAND_EYE_METHODS) == {"SHAH", "LI"}
