"""End to end in ManiSkill: a ChArUco board rendered by the sim camera is calibrated back to that camera.

One PickCube-v1 scene (CPU physics, SAPIEN rendering; lavapipe where there is no GPU) renders, once per
module: 16 views of a textured board in front of the 640x480 camera (robot moved away), then 14 views of
the board held by the Panda's TCP at perturbed joint positions (eye-to-hand). The board is a two-sided
textured quad whose vertices are the board frame itself, so its pose is known exactly. Calibrating from
those images must recover the camera's own intrinsics and pose; sim-camera must put the camera back
where it was, in the file format that sim-trainer's --camera-config loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from scipy.spatial.transform import Rotation

from calibration.boards import BoardSpec, board_image
from calibration.cli import main as calibrate
from calibration.io import read_camera_yaml, read_extrinsics_yaml
from calibration.kinematics import Chain, maniskill_panda_urdf
from calibration.sim_camera import rescale_intrinsics
from calibration.transforms import (
    cv_camera_to_sapien,
    from_sapien_pose_list,
    inv_T,
    make_T,
    pose_difference,
    quat_xyzw,
    to_sapien_pose_list,
)

SPEC = BoardSpec(7, 5, 0.03, 0.022, "DICT_5X5_100")
K_TRUE = np.array([[580.0, 0, 318.5], [0, 575.0, 243.2], [0, 0, 1]])  # fx != fy and an off-centre point on purpose
SIZE = (640, 480)
BOARD_ARGS = ["--board", "charuco", "--squares", "7x5", "--square-mm", "30", "--marker-mm", "22",
              "--dict", "DICT_5X5_100"]


@dataclass
class Rig:
    env: object
    out: Path
    world_T_base: np.ndarray
    world_T_cam: np.ndarray  # OpenCV axes
    samples: Path


def _board_entity(scene, texture: Path):
    """A two-sided quad in the board frame (origin at the top-left corner, x right, y down), board texture."""
    import sapien

    # base colour texture, plus the same texture as emission: under the task's lights white squares render
    # mid-grey, and corner accuracy needs the contrast of a well-lit real board
    tex = sapien.render.RenderTexture2D(str(texture), mipmap_levels=1, filter_mode="linear")
    mat = sapien.render.RenderMaterial(base_color=[1, 1, 1, 1], roughness=1.0, specular=0.0)
    mat.base_color_texture = tex
    mat.emission, mat.emission_texture = [1, 1, 1, 1], tex
    W, H = SPEC.columns * SPEC.square_m, SPEC.rows * SPEC.square_m
    v = np.array([[0, 0, 0], [W, 0, 0], [W, H, 0], [0, H, 0]], np.float32)
    uv = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], np.float32)
    normals = np.concatenate([np.tile([0, 0, -1], (4, 1)), np.tile([0, 0, 1], (4, 1))]).astype(np.float32)
    tris = np.array([[0, 1, 2], [0, 2, 3], [4, 6, 5], [4, 7, 6]], np.uint32)
    body = sapien.render.RenderBodyComponent()
    body.attach(sapien.render.RenderShapeTriangleMesh(np.concatenate([v, v]), tris, normals,
                                                      np.concatenate([uv, uv]), mat))
    entity = sapien.Entity()
    entity.add_component(body)
    scene.sub_scenes[0].add_entity(entity)
    return entity


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    import gymnasium as gym
    import mani_skill.envs  # noqa: F401
    import sapien
    import torch

    out = tmp_path_factory.mktemp("calib_rig")
    texture = out / "board_texture.png"  # SAPIEN needs a 3-channel texture: grey PNGs render as nothing
    cv2.imwrite(str(texture), cv2.cvtColor(board_image(SPEC, 300), cv2.COLOR_GRAY2BGR))
    env = gym.make("PickCube-v1", num_envs=1, obs_mode="rgb", sim_backend="physx_cpu", render_backend="cpu",
                   sensor_configs={"base_camera": {"width": SIZE[0], "height": SIZE[1], "fov": None,
                                                   "intrinsic": K_TRUE}})
    env.reset(seed=0)
    u = env.unwrapped
    scene, cam, robot = u.scene, u.scene.sensors["base_camera"], u.agent.robot
    board = _board_entity(scene, texture)

    def place(T):
        x, y, z, w = quat_xyzw(T[:3, :3])
        board.set_pose(sapien.Pose(T[:3, 3], [w, x, y, z]))

    def render_to(path: Path):
        scene.update_render()
        cam.capture()
        rgb = cam.get_obs(rgb=True, depth=False, segmentation=False, position=False)["rgb"][0].numpy()
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), rgb[..., ::-1])

    ext = cam.get_params()["extrinsic_cv"][0].numpy().astype(np.float64)
    world_T_cam = inv_T(np.vstack([ext, [0, 0, 0, 1]]))
    world_T_base = from_sapien_pose_list(robot.pose.raw_pose[0].tolist())
    tcp = lambda: from_sapien_pose_list(u.agent.tcp.pose.raw_pose[0].tolist())  # noqa: E731
    q0 = robot.get_qpos()[0].numpy().copy()
    W, H = SPEC.columns * SPEC.square_m, SPEC.rows * SPEC.square_m
    rng = np.random.default_rng(1)

    place(make_T(np.eye(3), [0, 0, -10]))
    render_to(out / "real.png")  # "the real camera": the task scene at seed 0, seen by the true camera

    robot.set_pose(sapien.Pose([-3, 0, 0]))  # out of the way of the intrinsics views
    for i in range(16):
        d = rng.uniform(0.28, 0.42)
        R = Rotation.from_euler("xyz", [*rng.uniform(-35, 35, 2), rng.uniform(-20, 20)], degrees=True).as_matrix()
        centre = np.array([rng.uniform(-0.35, 0.35) * d, rng.uniform(-0.25, 0.25) * d, d])
        place(world_T_cam @ make_T(R, centre - R @ np.array([W / 2, H / 2, 0])))
        render_to(out / "intrinsics" / f"{i:03d}.png")
    robot.set_pose(sapien.Pose(world_T_base[:3, 3], quat_xyzw(world_T_base[:3, :3])[[3, 0, 1, 2]]))

    # eye-to-hand: the board is rigidly held 12 cm in front of the TCP, facing the camera at the rest pose
    robot.set_qpos(torch.tensor(q0[None]))
    Rb = world_T_cam[:3, :3] @ Rotation.from_euler("x", 25, degrees=True).as_matrix()
    centre = tcp()[:3, 3] - 0.12 * world_T_cam[:3, 2] + 0.05 * world_T_cam[:3, 1]
    tcp_T_board = inv_T(tcp()) @ make_T(Rb, centre - Rb @ np.array([W / 2, H / 2, 0]))
    samples = []
    for i in range(14):
        q = q0.copy()
        q[:7] += rng.uniform(-1, 1, 7) * np.array([0.1, 0.1, 0.1, 0.12, 0.35, 0.3, 0.45])
        robot.set_qpos(torch.tensor(q[None]))
        place(tcp() @ tcp_T_board)
        render_to(out / "handeye" / f"{i:03d}.png")
        if i % 2:  # half the samples as joint states (forward kinematics inside), half as TCP poses
            samples.append({"image": f"handeye/{i:03d}.png",
                            "joint_positions": {f"panda_joint{j + 1}": float(q[j]) for j in range(7)}})
        else:
            samples.append({"image": f"handeye/{i:03d}.png", "tcp_pose": (inv_T(world_T_base) @ tcp()).tolist()})
    place(make_T(np.eye(3), [0, 0, -10]))
    robot.set_qpos(torch.tensor(q0[None]))
    doc = {"version": 1, "mount": "eye-to-hand", "intrinsics": "camera.yaml",
           "board": {"type": "charuco", "squares": "7x5", "square_mm": 30, "marker_mm": 22,
                     "dictionary": "DICT_5X5_100", "legacy_pattern": False},
           "frames": {"base": "panda_link0", "gripper": "panda_hand_tcp", "camera": "camera_color_optical_frame"},
           "samples": samples}
    (out / "samples.json").write_text(json.dumps(doc, indent=1))
    yield Rig(env, out, world_T_base, world_T_cam, out / "samples.json")
    env.close()


@pytest.fixture(scope="module")
def camera_yaml(rig):
    assert calibrate(["intrinsics", "--images", str(rig.out / "intrinsics"), *BOARD_ARGS,
                      "--out", str(rig.out / "camera.yaml")]) == 0
    return rig.out / "camera.yaml"


@pytest.fixture(scope="module")
def extrinsics_yaml(rig, camera_yaml):
    assert calibrate(["handeye", "--samples", str(rig.samples), "--mount", "eye-to-hand",
                      "--out", str(rig.out / "extrinsics.yaml")]) == 0
    return rig.out / "extrinsics.yaml"


def test_rendered_board_recovers_sim_intrinsics(rig, camera_yaml, capsys):
    cam = read_camera_yaml(camera_yaml)
    focal_err = [abs(cam.K[0, 0] / K_TRUE[0, 0] - 1) * 100, abs(cam.K[1, 1] / K_TRUE[1, 1] - 1) * 100]
    pp_err = np.abs(cam.K[:2, 2] - K_TRUE[:2, 2])
    print(f"\nintrinsics: focal error {focal_err[0]:.3f}% / {focal_err[1]:.3f}%, principal point error "
          f"{pp_err[0]:.2f} / {pp_err[1]:.2f} px")
    assert max(focal_err) < 1.0 and pp_err.max() < 2.0
    d = yaml.safe_load(camera_yaml.read_text())
    assert d["calibration"]["rms_px"] < 0.5 and len(d["calibration"]["views"]) >= 14
    assert (rig.out / "camera_coverage.png").exists()


def test_rms_gate_refuses(rig, capsys):
    rc = calibrate(["intrinsics", "--images", str(rig.out / "intrinsics"), *BOARD_ARGS, "--max-rms", "0.05",
                    "--out", str(rig.out / "refused.yaml")])
    assert rc == 2 and "above the gate of 0.05 px" in capsys.readouterr().err
    assert not (rig.out / "refused.yaml").exists()


def test_rendered_handeye_recovers_camera_pose(rig, extrinsics_yaml):
    truth = inv_T(rig.world_T_base) @ rig.world_T_cam  # base_T_cam
    ext = read_extrinsics_yaml(extrinsics_yaml)
    assert (ext.parent_frame, ext.child_frame, ext.mount) == ("panda_link0", "camera_color_optical_frame",
                                                               "eye-to-hand")
    dmm, ddeg = pose_difference(ext.T, truth)
    report = yaml.safe_load(extrinsics_yaml.read_text())["calibration"]
    lines = []
    for name, m in report["methods"].items():
        X = make_T(Rotation.from_quat(m["quaternion_xyzw"]).as_matrix(), m["translation"])
        lines.append(f"{name} {pose_difference(X, truth)[0]:.2f} mm {pose_difference(X, truth)[1]:.3f} deg")
    print(f"\nhand-eye (rendered, TSAI kept): {dmm:.2f} mm {ddeg:.3f} deg; " + "; ".join(lines))
    assert dmm < 5.0 and ddeg < 0.5
    assert len(report["samples_used"]) >= 12
    np.testing.assert_allclose(np.array(yaml.safe_load(extrinsics_yaml.read_text())["matrix"]), ext.T, atol=1e-9)


def test_rendered_handeye_names_the_sample_with_the_wrong_image(rig, camera_yaml, capsys):
    """Sample 4's robot pose paired with the image taken at sample 9's pose: refused, naming sample 4.

    Before the leave-one-out gate this was written with a warning only, tens of mm off.
    """
    import shutil

    doc = json.loads(rig.samples.read_text())
    shutil.copy(rig.out / "handeye" / "009.png", rig.out / "handeye" / "wrong.png")
    doc["samples"][4]["image"] = "handeye/wrong.png"
    (rig.out / "samples_wrong.json").write_text(json.dumps(doc))
    out = rig.out / "wrong_extrinsics.yaml"
    assert calibrate(["handeye", "--samples", str(rig.out / "samples_wrong.json"), "--mount", "eye-to-hand",
                      "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "1 sample disagrees" in err and "sample 4 (handeye/wrong.png) off by" in err
    assert not out.exists()
    # the good samples, their mounting not recorded, solved as eye-in-hand: refused, naming the right mounting
    doc = json.loads(rig.samples.read_text())
    del doc["mount"]
    (rig.out / "samples_no_mount.json").write_text(json.dumps(doc))
    assert calibrate(["handeye", "--samples", str(rig.out / "samples_no_mount.json"), "--mount", "eye-in-hand",
                      "--out", str(out)]) == 2
    assert "is --mount eye-to-hand the right mounting" in capsys.readouterr().err
    assert not out.exists()


def test_forward_kinematics_matches_maniskill_tcp(rig):
    import torch

    u = rig.env.unwrapped
    chain = Chain(maniskill_panda_urdf())
    q0 = u.agent.robot.get_qpos()[0].numpy().copy()
    rng = np.random.default_rng(7)
    try:
        for _ in range(5):
            q = q0.copy()
            q[:7] += rng.uniform(-0.8, 0.8, 7)
            u.agent.robot.set_qpos(torch.tensor(q[None]))
            sim = inv_T(rig.world_T_base) @ from_sapien_pose_list(u.agent.tcp.pose.raw_pose[0].tolist())
            fk = chain.forward({f"panda_joint{j + 1}": float(q[j]) for j in range(7)})
            dmm, ddeg = pose_difference(fk, sim)
            assert dmm < 0.01 and ddeg < 0.01, (dmm, ddeg)
    finally:
        u.agent.robot.set_qpos(torch.tensor(q0[None]))


def test_opencv_sapien_round_trip_through_maniskill_camera(rig):
    """A pose in OpenCV axes, converted and set on the ManiSkill camera, comes back from get_params()."""
    import sapien

    sensor = rig.env.unwrapped.scene.sensors["base_camera"]
    original = sensor.camera.get_local_pose()
    rng = np.random.default_rng(3)
    try:
        for _ in range(3):
            world_T_cam = make_T(Rotation.random(random_state=rng.integers(1 << 31)).as_matrix(),
                                 rng.uniform(-1, 1, 3))
            pose = to_sapien_pose_list(cv_camera_to_sapien(world_T_cam))
            sensor.camera.set_local_pose(sapien.Pose(pose[:3], pose[3:]))
            params = {k: v[0].numpy().astype(np.float64) for k, v in sensor.get_params().items()}
            np.testing.assert_allclose(params["extrinsic_cv"], inv_T(world_T_cam)[:3], atol=1e-5)
            np.testing.assert_allclose(params["cam2world_gl"], world_T_cam @ np.diag([1, -1, -1, 1]), atol=1e-5)
            np.testing.assert_allclose(params["intrinsic_cv"], K_TRUE, atol=1e-3)
    finally:
        sensor.camera.set_local_pose(original.sp)


def test_sim_camera_config_loads_in_env_layer_and_aligns(rig, camera_yaml, extrinsics_yaml):
    from sim_trainer.cli import _camera_overrides
    from sim_trainer.envs.make import make_maniskill_env
    from sim_trainer.envs.spec import EnvConfig

    out = rig.out / "sim_camera.yaml"
    assert calibrate(["sim-camera", "--intrinsics", str(camera_yaml), "--extrinsics", str(extrinsics_yaml),
                      "--task", "PickCube-v1", "--image-size", "64", "--real-image", str(rig.out / "real.png"),
                      "--out", str(out)]) == 0
    cfg = yaml.safe_load(out.read_text())
    score = cfg["alignment"]["edge_fscore"]
    # the same camera 2 cm and 2 degrees off must score clearly worse against the same real image
    off = yaml.safe_load(extrinsics_yaml.read_text())
    T = np.array(off["matrix"]) @ make_T(Rotation.from_euler("y", 2.0, degrees=True).as_matrix(), [0.02, 0, 0])
    off.update(matrix=T.tolist(), translation=T[:3, 3].tolist(), quaternion_xyzw=quat_xyzw(T[:3, :3]).tolist())
    (rig.out / "off.yaml").write_text(yaml.safe_dump(off))
    assert calibrate(["sim-camera", "--intrinsics", str(camera_yaml), "--extrinsics", str(rig.out / "off.yaml"),
                      "--real-image", str(rig.out / "real.png"), "--out", str(rig.out / "off_camera.yaml")]) == 0
    off_score = yaml.safe_load((rig.out / "off_camera.yaml").read_text())["alignment"]["edge_fscore"]
    print(f"\nsim-camera: edge F-score {score:.3f} (2 cm / 2 deg off: {off_score:.3f}), "
          f"randomisation {cfg['randomization']['base_camera']}")
    assert score > 0.7 and off_score < score - 0.2
    assert cv2.imread(str(rig.out / "sim_camera_overlay.png")).shape == (480, 640, 3)
    dr = cfg["randomization"]["base_camera"]
    assert 0.002 <= dr["position_m"] < 0.03 and 0.2 <= dr["rotation_deg"] < 3.0

    env = make_maniskill_env(EnvConfig(task="PickCube-v1", obs_mode="rgb", image_size=64,
                                       cameras=_camera_overrides(str(out))).validate())
    try:
        obs, _ = env.reset(seed=0)
        assert tuple(obs["sensor_data"]["base_camera"]["rgb"].shape) == (1, 64, 64, 3)
        params = {k: v[0].numpy().astype(np.float64)
                  for k, v in env.unwrapped.scene.sensors["base_camera"].get_params().items()}
    finally:
        env.close()
    world_T_cam = inv_T(np.vstack([params["extrinsic_cv"], [0, 0, 0, 1]]))
    dmm, ddeg = pose_difference(world_T_cam, rig.world_T_cam)
    print(f"camera loaded by the env layer: {dmm:.2f} mm / {ddeg:.3f} deg from the true camera")
    assert dmm < 5.0 and ddeg < 0.5, (dmm, ddeg)
    K64 = rescale_intrinsics(K_TRUE, SIZE, (64, 64))
    np.testing.assert_allclose(params["intrinsic_cv"][[0, 1], [0, 1]], K64[[0, 1], [0, 1]], rtol=0.01)
    np.testing.assert_allclose(params["intrinsic_cv"][:2, 2], K64[:2, 2], atol=0.2)
