"""How an environment is built (EnvConfig); what a policy is trained for (PolicySpec) is the contract's.

PolicySpec and CameraSpec are defined in policy_runtime.contract (the robot side reads them without torch)
and re-exported here for the trainer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from policy_runtime.contract import PolicySpec
from policy_runtime.contract import short as _short
from sim_trainer.envs.tasks import CONTROL_MODES, OBS_MODES, get_task
from sim_trainer.errors import UserError

MAX_CAMERA_SIDE = 4096  # pixels: a larger camera is a typo that would exhaust memory in every env worker


@dataclass
class CameraOverride:
    """A camera placed and shaped like a calibrated real one (OpenCV intrinsics, SAPIEN-convention pose)."""

    pose: list[float] | None = None  # [x, y, z, qw, qx, qy, qz] in the world frame, SAPIEN camera axes
    intrinsic: list[list[float]] | None = None  # 3x3 K at (width, height)
    fov: float | None = None  # vertical field of view in radians, alternative to intrinsic
    width: int | None = None
    height: int | None = None

    def validate(self, name: str) -> CameraOverride:
        """Check every value here, in the main process: the env workers would only fail with a traceback."""
        import numpy as np

        where = f"camera {name!r}"
        if self.pose is not None:
            pose = _finite_array(self.pose, f"{where} pose")
            if pose.shape != (7,):
                raise UserError(f"{where} pose must be [x, y, z, qw, qx, qy, qz], got {_short(self.pose)}")
            if not 0.5 < float(np.linalg.norm(pose[3:])) < 2.0:
                raise UserError(f"{where} pose quaternion {pose[3:].tolist()} is not a rotation (norm far from 1)")
        if self.intrinsic is not None and self.fov is not None:
            raise UserError(f"give {where} either an intrinsic matrix or a fov, not both")
        if self.intrinsic is not None:
            k = _finite_array(self.intrinsic, f"{where} intrinsic")
            if k.shape != (3, 3):
                raise UserError(f"{where} intrinsic must be 3x3, got shape {k.shape}")
            if not (k[0, 0] > 0 and k[1, 1] > 0):
                raise UserError(f"{where} intrinsic focal lengths must be positive, got {k[0, 0]} and {k[1, 1]}")
        if self.fov is not None:
            fov = _finite_array(self.fov, f"{where} fov")
            if fov.shape != () or not 0 < float(fov) < np.pi:
                raise UserError(f"{where} fov must be one angle in radians in (0, pi), got {_short(self.fov)}")
        for side in ("width", "height"):
            v = getattr(self, side)
            if v is not None and (type(v) is not int or not 1 <= v <= MAX_CAMERA_SIDE):
                raise UserError(f"{where} {side} must be a whole number of pixels in 1..{MAX_CAMERA_SIDE}, "
                                f"got {_short(v)}")
        return self

    def to_sensor_config(self) -> dict:
        cfg: dict = {}
        if self.pose is not None:
            cfg["pose"] = [float(x) for x in self.pose]
        if self.intrinsic is not None:
            import numpy as np

            cfg["intrinsic"] = np.asarray(self.intrinsic, dtype=np.float64)
            cfg["fov"] = None
        if self.fov is not None:
            cfg["fov"] = float(self.fov)
            cfg["intrinsic"] = None
        if self.width is not None:
            cfg["width"] = int(self.width)
        if self.height is not None:
            cfg["height"] = int(self.height)
        return cfg


def _finite_array(value: object, what: str):
    """`value` as a float array, or a UserError naming `what` (strings, nested junk, NaN and Inf refused)."""
    import numpy as np

    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be numbers, got {_short(value)}") from None
    if isinstance(value, (str, bytes, bool)) or not np.isfinite(arr).all():
        raise UserError(f"{what} must be finite numbers, got {_short(value)}")
    return arr


def camera_overrides(data: object, where: str) -> dict[str, CameraOverride]:
    """The camera overrides of a parsed camera config: {name: {pose, intrinsic, fov, width, height}}.

    A config written by `calibrate sim-camera` keeps them under `cameras:` beside its other keys.
    """
    if isinstance(data, dict) and "cameras" in data:
        data = data["cameras"]
    if not isinstance(data, dict):
        raise UserError(f"camera config {where}: expected a mapping of camera name to settings, got {_short(data)}")
    known = [f.name for f in fields(CameraOverride)]
    out = {}
    for name, v in data.items():
        v = {} if v is None else v
        if not isinstance(v, dict):
            raise UserError(f"camera config {where}: camera {name!r} must be a mapping of settings, got {_short(v)}")
        unknown = sorted(set(map(str, v)) - set(known))
        if unknown:
            raise UserError(f"camera config {where}: camera {name!r} has unknown keys {unknown}; "
                            f"known: {', '.join(known)}")
        out[str(name)] = CameraOverride(**v).validate(str(name))
    return out


@dataclass
class EnvConfig:
    """Everything needed to build the same environment again, in a worker process or on another host."""

    task: str = "PickCube-v1"
    obs_mode: str = "rgb"  # "rgb": cameras + proprio state; "state": full low-dim state, no rendering
    control_mode: str = "pd_joint_delta_pos"
    image_size: int = 64  # the policy's resolution; cameras render at it unless overridden
    reward_mode: str = "sparse"  # or "normalized_dense"
    sim_backend: str = "physx_cpu"  # or "physx_cuda" (many envs in one process)
    max_episode_steps: int | None = None  # None: the task's evaluation horizon
    cameras: dict[str, CameraOverride] = field(default_factory=dict)
    domain: str | None = None  # None: the plain sim; "real_proxy" or a domain YAML (sim_trainer/envs/domain.py)

    def validate(self) -> EnvConfig:
        get_task(self.task)
        if self.obs_mode not in OBS_MODES:
            raise UserError(f"unknown obs mode {self.obs_mode!r}; choose one of {OBS_MODES}")
        if self.control_mode not in CONTROL_MODES:
            raise UserError(f"unknown control mode {self.control_mode!r}; choose one of {CONTROL_MODES}")
        if self.reward_mode not in ("sparse", "normalized_dense", "dense"):
            raise UserError(f"unknown reward mode {self.reward_mode!r}")
        if self.sim_backend not in ("physx_cpu", "physx_cuda"):
            raise UserError(f"unknown sim backend {self.sim_backend!r}; use physx_cpu or physx_cuda")
        if self.image_size < 16:
            raise UserError("image_size must be at least 16 pixels")
        task_cameras = get_task(self.task).cameras
        for name, override in self.cameras.items():
            if name not in task_cameras:
                raise UserError(f"{self.task} has no camera {name!r} to override; its cameras: "
                                f"{', '.join(task_cameras)}")
            override.validate(name)
        if self.domain is not None:
            from sim_trainer.envs.domain import load_domain

            load_domain(self.domain)
        return self

    @property
    def horizon(self) -> int:
        return self.max_episode_steps or get_task(self.task).max_episode_steps

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EnvConfig:
        d = dict(d)
        cams = {k: CameraOverride(**v) for k, v in (d.pop("cameras", None) or {}).items()}
        return cls(**d, cameras=cams).validate()

    @classmethod
    def for_policy(cls, spec: PolicySpec, task: str | None = None, **settings) -> EnvConfig:
        """The environment a policy was trained for (its task unless `task`; its modes and image size), checked.

        `settings` are the run's own choices (sim backend, reward, episode length, camera overrides, domain).
        """
        return cls(task=task or spec.task, obs_mode=spec.obs_mode, control_mode=spec.control_mode,
                   image_size=spec.cameras[0].height if spec.cameras else cls.image_size, **settings).validate()
