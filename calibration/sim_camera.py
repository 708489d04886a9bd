"""Turn a calibrated real camera into a ManiSkill camera: axes, resolution, config file, rendering.

The config written here is the `--camera-config` YAML that sim-trainer loads (sim_trainer.envs.spec.
CameraOverride per camera name: pose [x, y, z, qw, qx, qy, qz] in the world frame with SAPIEN camera axes,
3x3 intrinsic at width x height). Extra top-level keys (the randomisation range, provenance) are ignored
by that loader, which reads only the `cameras` mapping.
"""

from __future__ import annotations

import numpy as np

from calibration.io import CameraIntrinsics, Extrinsics
from calibration.transforms import cv_camera_to_sapien, from_sapien_pose_list, to_sapien_pose_list
from policy_runtime.errors import UserError

# Widest camera pose randomisation written: beyond it the training camera no longer resembles the real one,
# and a range that wide comes from a broken calibration (an uncertainty of metres), not from a real camera.
MAX_DR_MM = 50.0
MAX_DR_DEG = 10.0


def rescale_intrinsics(K: np.ndarray, src_size: tuple[int, int], dst_size: tuple[int, int]) -> np.ndarray:
    """K for the whole image resized from src (w, h) to dst (w, h); pixel centres sit at integer coordinates."""
    sx, sy = dst_size[0] / src_size[0], dst_size[1] / src_size[1]
    out = np.array(K, dtype=np.float64)
    out[0, 0], out[0, 1], out[1, 1] = K[0, 0] * sx, K[0, 1] * sx, K[1, 1] * sy
    out[0, 2] = (K[0, 2] + 0.5) * sx - 0.5
    out[1, 2] = (K[1, 2] + 0.5) * sy - 0.5
    return out


def require_fixed_camera(ext: Extrinsics) -> None:
    if ext.mount != "eye-to-hand":
        raise UserError(f"sim-camera places a fixed camera, but the extrinsics are {ext.mount} (a camera on the "
                        "gripper moves with it; mount it on the hand link in the robot's config instead)")


def world_T_camera_cv(ext: Extrinsics, world_T_base: np.ndarray) -> np.ndarray:
    """The camera's pose in the sim world (OpenCV axes) from a fixed-camera hand-eye result."""
    require_fixed_camera(ext)
    return world_T_base @ ext.T


def camera_override(intr: CameraIntrinsics, world_T_cam_cv: np.ndarray, size: tuple[int, int]) -> dict:
    """One camera's entry of the camera-config YAML (the fields of sim_trainer's CameraOverride)."""
    K = rescale_intrinsics(intr.K, (intr.width, intr.height), size)
    return {"pose": to_sapien_pose_list(cv_camera_to_sapien(world_T_cam_cv)),
            "intrinsic": [[float(v) for v in row] for row in K],
            "width": int(size[0]), "height": int(size[1])}


def randomization(ext: Extrinsics, scale: float, min_mm: float, min_deg: float) -> dict:
    """Camera pose randomisation bounds for training, scale x the hand-eye uncertainty (with floors).

    Refused beyond MAX_DR_MM / MAX_DR_DEG, and for negative or non-finite inputs (the options are checked
    by the CLI; the uncertainty by the extrinsics reader; checked again here for other callers).
    """
    values = (scale, min_mm, min_deg, ext.uncertainty_mm, ext.uncertainty_deg)
    if not all(np.isfinite(v) and v >= 0 for v in values):
        raise UserError(f"randomisation inputs must be finite and >= 0: scale {scale}, floors {min_mm} mm / "
                        f"{min_deg} deg, uncertainty {ext.uncertainty_mm} mm / {ext.uncertainty_deg} deg")
    pos_mm = max(scale * ext.uncertainty_mm, min_mm)
    rot_deg = max(scale * ext.uncertainty_deg, min_deg)
    if pos_mm > MAX_DR_MM or rot_deg > MAX_DR_DEG:
        raise UserError(f"the randomisation range would be +/-{pos_mm:.1f} mm / +/-{rot_deg:.2f} deg ({scale:g} x the "
                        f"extrinsics' uncertainty of {ext.uncertainty_mm:g} mm / {ext.uncertainty_deg:g} deg), beyond "
                        f"+/-{MAX_DR_MM:g} mm / +/-{MAX_DR_DEG:g} deg: recalibrate (calibrate handeye) or lower "
                        "--dr-scale")
    return {"position_m": round(pos_mm / 1000.0, 6), "rotation_deg": round(rot_deg, 4),
            "about": "uniform +/- per world axis (position) and per camera axis (rotation), around the pose",
            "derived_from": {"uncertainty_mm": ext.uncertainty_mm, "uncertainty_deg": ext.uncertainty_deg,
                             "scale": scale, "min_mm": min_mm, "min_deg": min_deg}}


class SimCamera:
    """A ManiSkill task with one of its cameras replaced by the calibrated one, for rendering checks."""

    def __init__(self, task: str, camera: str, intr: CameraIntrinsics, size: tuple[int, int], seed: int = 0):
        import gymnasium as gym
        import mani_skill.envs  # noqa: F401  (registers the tasks)

        try:
            self.env = gym.make(task, num_envs=1, obs_mode="rgb", sim_backend="physx_cpu", render_backend="cpu",
                                sensor_configs={camera: {"width": int(size[0]), "height": int(size[1]), "fov": None,
                                                         "intrinsic": rescale_intrinsics(intr.K, (intr.width,
                                                                                                  intr.height), size)}})
        except gym.error.Error as e:
            raise UserError(f"cannot make task {task!r}: {e}") from None
        except AttributeError:  # ManiSkill reads an unknown camera name as an unknown camera attribute
            raise UserError(f"task {task} has no camera {camera!r} (PickCube-v1 and the other tabletop tasks "
                            "have base_camera)") from None
        self.env.reset(seed=seed)
        self.sensor = self.env.unwrapped.scene.sensors[camera]

    @property
    def world_T_base(self) -> np.ndarray:
        return from_sapien_pose_list(self.env.unwrapped.agent.robot.pose.raw_pose[0].tolist())

    def render(self, pose: list[float]) -> np.ndarray:
        """RGB uint8 image from the camera placed at a SAPIEN-axes pose [x, y, z, qw, qx, qy, qz]."""
        import sapien

        self.sensor.camera.set_local_pose(sapien.Pose(pose[:3], pose[3:]))
        scene = self.env.unwrapped.scene
        scene.update_render()
        self.sensor.capture()
        return self.sensor.get_obs(rgb=True, depth=False, segmentation=False, position=False)["rgb"][0].numpy()

    def close(self) -> None:
        self.env.close()
