"""`calibrate`: ChArUco intrinsics, hand-eye extrinsics, and the calibrated camera placed in ManiSkill.

Every user mistake (missing file, no board found, too few or degenerate views, a result above the
error gate, an option out of range) ends in one line on stderr and exit code 2, never a traceback.
Outputs are checked before the work, written only once every gate has passed, atomically, and an
existing file is never replaced without --force (calibration.outputs; docs/calibration.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from calibration.checks import arg_integer, arg_number
from policy_runtime.errors import OneLineParser, UserError, run_command


def _board_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--board", default="charuco", choices=("charuco",), help="calibration target type")
    p.add_argument("--squares", default="7x5", help="chessboard squares as COLUMNSxROWS (default 7x5)")
    p.add_argument("--square-mm", type=arg_number(0, 2000, low_open=True), default=30.0,
                   help="side of one chessboard square in mm, as printed")
    p.add_argument("--marker-mm", type=arg_number(0, 2000, low_open=True), default=22.0,
                   help="side of one ArUco marker in mm, as printed")
    p.add_argument("--dict", default="DICT_5X5_100", help="ArUco dictionary of the markers, e.g. DICT_5X5_100")
    p.add_argument("--legacy-pattern", action="store_true",
                   help="board made with the pre-OpenCV-4.6 layout (even row counts; e.g. calib.io boards)")


def _frame_name(text: str) -> str:
    if not text.strip() or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"a frame name must be non-empty without spaces, got {text!r}")
    return text


def _force_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true",
                   help="replace output files that exist already (without it, an existing output is refused)")


def _board_spec(a: argparse.Namespace):
    from calibration.boards import BoardDetector, BoardSpec, parse_squares

    cols, rows = parse_squares(a.squares)
    spec = BoardSpec(cols, rows, a.square_mm / 1000.0, a.marker_mm / 1000.0, a.dict, a.legacy_pattern)
    BoardDetector(spec)  # refuses an impossible board (marker >= square, unknown dictionary) before the work
    return spec


def _sibling(out: str, suffix: str) -> Path:
    p = Path(out)
    return p.with_name(p.stem + suffix)


def cmd_board(a: argparse.Namespace) -> int:
    from calibration.boards import board_image
    from calibration.outputs import check_image_suffix, check_outputs, image_bytes, write_new

    out = Path(a.out)
    check_image_suffix(out)
    check_outputs([out], force=a.force)
    img = board_image(_board_spec(a), a.px_per_square, a.margin_px)
    write_new(out, image_bytes(out, img), force=a.force)
    print(f"wrote {a.out} ({img.shape[1]}x{img.shape[0]} px)")
    return 0


def cmd_intrinsics(a: argparse.Namespace) -> int:
    from calibration.intrinsics import calibrate_intrinsics, check_rms_gate, coverage_image, list_images, read_image
    from calibration.io import CameraIntrinsics, camera_yaml
    from calibration.outputs import check_image_suffix, check_outputs, image_bytes, write_new, yaml_bytes

    spec = _board_spec(a)
    images = list_images(a.images)
    out = Path(a.out)
    coverage_path = Path(a.coverage) if a.coverage else _sibling(a.out, "_coverage.png")
    check_image_suffix(coverage_path)
    if coverage_path.resolve().parent == Path(a.images).resolve():
        raise UserError(f"--coverage {coverage_path} is inside --images {a.images}: the next run would read it as a "
                        "board view; write it elsewhere")
    check_outputs([out, coverage_path], force=a.force, inputs=tuple(images))
    result = calibrate_intrinsics(images, spec)
    check_rms_gate(result, a.max_rms)
    report = {"rms_px": round(result.rms, 4), "max_rms_px": a.max_rms, "coverage": round(result.coverage, 3),
              "views": {n: round(e, 4) for n, e in result.per_view.items()}, "skipped": result.skipped,
              "board": spec.to_dict()}
    cam = CameraIntrinsics(result.width, result.height, result.K, result.dist, a.camera_name)
    write_new(coverage_path, image_bytes(coverage_path, coverage_image(result, read_image(images[0]))),
              force=a.force)
    write_new(out, yaml_bytes(camera_yaml(cam, report)), force=a.force)
    K = result.K
    print(f"RMS {result.rms:.3f} px over {len(result.per_view)} views ({len(result.skipped)} skipped), "
          f"fx {K[0, 0]:.2f} fy {K[1, 1]:.2f} cx {K[0, 2]:.2f} cy {K[1, 2]:.2f}, corner coverage "
          f"{result.coverage:.0%}")
    worst = max(result.per_view.items(), key=lambda kv: kv[1])
    print(f"worst view {worst[0]} {worst[1]:.3f} px; coverage image {coverage_path}; wrote {a.out}")
    if result.coverage < 0.5:
        print("note: corners cover under half of the image; add views with the board near the edges and corners")
    return 0


def cmd_handeye(a: argparse.Namespace) -> int:
    from calibration.handeye import HAND_EYE_METHODS, Gate, calibrate_handeye
    from calibration.io import Extrinsics, extrinsics_yaml
    from calibration.outputs import check_outputs, write_new, yaml_bytes
    from calibration.samples import load_samples, measure
    from calibration.transforms import pose_difference, quat_xyzw

    samples = load_samples(a.samples)
    if samples.mount is not None and samples.mount != a.mount:
        raise UserError(f"{a.samples} was captured as {samples.mount} but --mount is {a.mount}")
    check_outputs([Path(a.out)], force=a.force,
                  inputs=(Path(a.samples), samples.intrinsics_path, *samples.images))
    m = measure(samples)
    res = calibrate_handeye(m.base_T_gripper, m.cam_T_board, a.mount, a.method.upper(), a.leave_out,
                            gate=Gate(a.max_residual_mm, a.max_residual_deg), labels=m.labels)
    parent = a.parent_frame or (samples.base_frame if a.mount == "eye-to-hand" else samples.gripper_frame)
    child = a.child_frame or samples.camera_frame
    methods = {}
    print(f"{len(m.used)} samples used, {len(m.skipped)} skipped; {res.mount}, X = {parent} -> {child}")
    print(f"{'method':<11}{'board spread mm':>16}{'deg':>7}{'vs ' + res.method + ' mm':>14}{'deg':>7}")
    for name, r in res.methods.items():
        dmm, ddeg = pose_difference(res.X, r.X)
        c = r.consistency
        methods[name] = {"translation": [float(v) for v in r.X[:3, 3]],
                         "quaternion_xyzw": [float(v) for v in quat_xyzw(r.X[:3, :3])],
                         "consistency": c.to_dict(), "difference_mm": round(dmm, 4), "difference_deg": round(ddeg, 4),
                         "kind": "hand-eye" if name in HAND_EYE_METHODS else "robot-world"}
        print(f"{name:<11}{c.translation_rms_mm:>16.2f}{c.rotation_rms_deg:>7.3f}{dmm:>14.2f}{ddeg:>7.3f}")
    lo = res.leave_out
    worst = int(res.residuals[:, 0].argmax())
    print(f"leave-{res.leave_out_k}-out: max {lo.translation_max_mm:.2f} mm / {lo.rotation_max_deg:.3f} deg "
          f"(jackknife s.e. {res.jackknife_mm:.2f} mm / {res.jackknife_deg:.3f} deg); uncertainty "
          f"{res.uncertainty_mm:.2f} mm / {res.uncertainty_deg:.3f} deg")
    print(f"largest leave-one-out residual {res.residuals[worst, 0]:.2f} mm / {res.residuals[worst, 1]:.3f} deg "
          f"({m.labels[worst]}), gate {a.max_residual_mm:g} mm / {a.max_residual_deg:g} deg")
    for note in res.notes:
        print(f"warning: {note}", file=sys.stderr)
    report = {"method": res.method, "samples_used": m.used, "skipped": m.skipped,
              "pnp_rms_px": [round(v, 4) for v in m.pnp_rms], "methods": methods,
              "leave_out": {"k": res.leave_out_k, **lo.to_dict(), "jackknife_mm": round(res.jackknife_mm, 4),
                            "jackknife_deg": round(res.jackknife_deg, 4)},
              "residuals": {"gate_mm": a.max_residual_mm, "gate_deg": a.max_residual_deg,
                            "loo_mm": [round(float(v), 4) for v in res.residuals[:, 0]],
                            "loo_deg": [round(float(v), 4) for v in res.residuals[:, 1]]}}
    ext = Extrinsics(parent, child, res.X, res.mount, res.uncertainty_mm, res.uncertainty_deg)
    write_new(Path(a.out), yaml_bytes(extrinsics_yaml(ext, report)), force=a.force)
    print(f"wrote {a.out}")
    return 0


def cmd_sim_camera(a: argparse.Namespace) -> int:
    import cv2

    from calibration.alignment import edge_fscore, overlay
    from calibration.intrinsics import read_image
    from calibration.io import read_camera_yaml, read_extrinsics_yaml
    from calibration.outputs import check_outputs, image_bytes, write_new, yaml_bytes
    from calibration.sim_camera import (
        SimCamera,
        camera_override,
        randomization,
        require_fixed_camera,
        world_T_camera_cv,
    )

    intr = read_camera_yaml(a.intrinsics)
    ext = read_extrinsics_yaml(a.extrinsics)
    require_fixed_camera(ext)
    dr = randomization(ext, a.dr_scale, a.dr_min_mm, a.dr_min_deg)
    real = None
    if a.real_image:
        real = read_image(a.real_image)
        if (real.shape[1], real.shape[0]) != (intr.width, intr.height):
            raise UserError(f"{a.real_image} is {real.shape[1]}x{real.shape[0]} but the intrinsics are for "
                            f"{intr.width}x{intr.height}")
    out, sim_path, ov_path = Path(a.out), _sibling(a.out, "_sim.png"), _sibling(a.out, "_overlay.png")
    inputs = tuple(Path(p) for p in (a.intrinsics, a.extrinsics, a.real_image) if p)
    check_outputs([out, sim_path] + ([ov_path] if real is not None else []), force=a.force, inputs=inputs)
    full = (intr.width, intr.height)
    sim = SimCamera(a.task, a.camera, intr, full, seed=a.seed)
    try:
        world_T_cam = world_T_camera_cv(ext, sim.world_T_base)
        full_cfg = camera_override(intr, world_T_cam, full)
        view = cv2.cvtColor(sim.render(full_cfg["pose"]), cv2.COLOR_RGB2BGR)
        world_T_base = sim.world_T_base
    finally:
        sim.close()
    cfg = {"cameras": {a.camera: camera_override(intr, world_T_cam, (a.image_size, a.image_size))},
           "randomization": {a.camera: dr},
           "source": {"intrinsics": str(a.intrinsics), "extrinsics": str(a.extrinsics), "task": a.task,
                      "world_T_base": [[float(v) for v in row] for row in world_T_base],
                      "base_frame": ext.parent_frame, "camera_frame": ext.child_frame}}
    msg = f"wrote {a.out} (camera {a.camera} at {a.image_size}x{a.image_size}) and sim view {sim_path}"
    images = {sim_path: view}
    if real is not None:
        undistorted = cv2.undistort(real, intr.K, intr.dist, None, intr.K)
        score = edge_fscore(view, undistorted, a.edge_tol)
        cfg["alignment"] = {"real_image": str(a.real_image), **score}
        images[ov_path] = overlay(view, undistorted)
        msg += (f"; overlay {ov_path}; edge F-score {score['edge_fscore']:.3f} (precision {score['precision']:.3f}, "
                f"recall {score['recall']:.3f}, tolerance {a.edge_tol:g} px)")
    for path, img in images.items():
        write_new(path, image_bytes(path, img), force=a.force)
    write_new(out, yaml_bytes(cfg), force=a.force)
    print(msg)
    print(f"randomisation for training: position +/-{dr['position_m'] * 1000:.1f} mm, rotation "
          f"+/-{dr['rotation_deg']:.2f} deg")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from calibration.handeye import METHODS, MOUNTS, Gate
    from calibration.sim_camera import MAX_DR_DEG, MAX_DR_MM

    p = OneLineParser(prog="calibrate", description=(
        "Calibrate the real camera and put it into simulation. Typical flow: `intrinsics` (ChArUco images -> "
        "camera.yaml) -> `handeye` (robot poses + board images -> extrinsics.yaml) -> `sim-camera` (a ManiSkill "
        "camera config for `sim-trainer --camera-config`, a sim/real overlay and a randomisation range). "
        "File formats: docs/calibration.md."))
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("board", help="write a ChArUco board image to print (or to texture a sim board)")
    _board_args(b)
    b.add_argument("--px-per-square", type=arg_integer(10, 2000), default=200,
                   help="resolution of the image per square (10-2000)")
    b.add_argument("--margin-px", type=arg_integer(0, 10000), default=0, help="white margin around the board")
    b.add_argument("--out", required=True, help="output image (.png, .jpg, .bmp or .tif)")
    _force_arg(b)
    b.set_defaults(func=cmd_board)

    i = sub.add_parser("intrinsics", help="camera matrix and distortion from ChArUco images",
                       description="Detect the ChArUco board in every image (OpenCV CharucoDetector), calibrate "
                                   "(cv2.calibrateCamera) and write a ROS camera_info YAML with RMS and per-view "
                                   "errors, plus a PNG of every detected corner. A result above --max-rms is refused.")
    i.add_argument("--images", required=True, help="directory of images of the board (png/jpg/bmp/tif)")
    _board_args(i)
    i.add_argument("--max-rms", type=arg_number(0, 100, low_open=True), default=0.5,
                   help="refuse results with a larger RMS error (px, > 0)")
    i.add_argument("--camera-name", default="camera", help="camera_name written in the YAML")
    i.add_argument("--coverage", help="corner coverage PNG (default: OUT's name + _coverage.png)")
    i.add_argument("--out", required=True, help="camera YAML to write")
    _force_arg(i)
    i.set_defaults(func=cmd_intrinsics)

    h = sub.add_parser("handeye", help="camera pose relative to the robot from robot poses + board images",
                       description="Estimate the board pose in every sample image, solve the hand-eye problem with "
                                   "all five cv2.calibrateHandEye methods and both robot-world methods, check chain "
                                   "consistency and leave-k-out refits, and write the kept method's transform.")
    h.add_argument("--samples", required=True, help="samples.json (format: docs/calibration.md)")
    h.add_argument("--mount", required=True, choices=MOUNTS,
                   help="eye-in-hand: camera on the gripper, board fixed -> gripper_T_cam; eye-to-hand: camera "
                        "fixed, board held by the gripper -> base_T_cam")
    h.add_argument("--method", default="TSAI", type=str.upper, choices=METHODS,
                   help="method whose result is written (all are run and compared)")
    h.add_argument("--leave-out", type=arg_integer(1, 1000), default=1, help="k for the leave-k-out refits")
    h.add_argument("--max-residual-mm", type=arg_number(0, 1000, low_open=True), default=Gate.max_mm,
                   help="refuse when a sample's leave-one-out residual or the result's uncertainty is larger (mm)")
    h.add_argument("--max-residual-deg", type=arg_number(0, 180, low_open=True), default=Gate.max_deg,
                   help="the same gate for rotation (deg)")
    h.add_argument("--parent-frame", type=_frame_name, help="parent frame name (default from samples.json frames)")
    h.add_argument("--child-frame", type=_frame_name, help="camera frame name (default from samples.json frames)")
    h.add_argument("--out", required=True, help="extrinsics YAML to write")
    _force_arg(h)
    h.set_defaults(func=cmd_handeye)

    s = sub.add_parser("sim-camera", help="the calibrated camera as a ManiSkill camera config, with sim/real overlay",
                       description="Convert the camera pose to SAPIEN axes in the task's world, rescale the "
                                   "intrinsics to the training resolution, write the --camera-config YAML of "
                                   "sim-trainer with a pose randomisation range, render the sim view and, given a "
                                   "real image, a 50/50 overlay and an edge F-score.")
    s.add_argument("--intrinsics", required=True, help="camera YAML from `calibrate intrinsics`")
    s.add_argument("--extrinsics", required=True, help="eye-to-hand extrinsics YAML from `calibrate handeye`")
    s.add_argument("--task", default="PickCube-v1", help="ManiSkill task whose world the camera is placed in")
    s.add_argument("--camera", default="base_camera", help="the task's camera to replace")
    s.add_argument("--image-size", type=arg_integer(16, 2048), default=64,
                   help="training resolution (square, as sim-trainer's; 16-2048)")
    s.add_argument("--real-image", help="a real image from the camera, for the overlay and alignment score")
    s.add_argument("--edge-tol", type=arg_number(0, 100, low_open=True), default=2.0,
                   help="edge distance counted as aligned (px)")
    s.add_argument("--dr-scale", type=arg_number(0, 100), default=3.0,
                   help="randomisation bound = scale x hand-eye uncertainty")
    s.add_argument("--dr-min-mm", type=arg_number(0, MAX_DR_MM), default=2.0,
                   help="smallest position randomisation bound (mm)")
    s.add_argument("--dr-min-deg", type=arg_number(0, MAX_DR_DEG), default=0.2,
                   help="smallest rotation randomisation bound (deg)")
    s.add_argument("--seed", type=arg_integer(0, 2**31 - 1), default=0, help="episode seed of the rendered scene")
    s.add_argument("--out", required=True, help="camera config YAML to write (images are written beside it)")
    _force_arg(s)
    s.set_defaults(func=cmd_sim_camera)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("calibrate", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    import cv2  # not at import time: `calibrate --help` stays quick

    try:
        return args.func(args)
    except cv2.error as e:
        raise UserError(f"OpenCV refused the input: {str(e).strip().splitlines()[-1]}") from None


if __name__ == "__main__":
    sys.exit(main())
