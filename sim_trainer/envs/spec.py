"""What a policy is trained for (PolicySpec) and how an environment is built (EnvConfig).

The PolicySpec is stored in every checkpoint and export: loading a policy against a task compares the
two specs and names every difference, so a mismatch is an error message, not a silent failure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from sim_trainer.envs.tasks import CONTROL_MODES, OBS_MODES, get_task
from sim_trainer.errors import UserError


@dataclass(frozen=True)
class CameraSpec:
    name: str
    height: int
    width: int


@dataclass(frozen=True)
class PolicySpec:
    """Observation and action contract between an environment (sim or real) and a policy."""

    task: str
    control_mode: str
    obs_mode: str
    cameras: tuple[CameraSpec, ...]
    state_layout: tuple[tuple[str, int], ...]  # (name, size) of each block of the flat state vector
    action_dim: int
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]
    control_hz: float
    instruction: str

    @property
    def state_dim(self) -> int:
        return sum(n for _, n in self.state_layout)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["state_layout"] = [list(x) for x in self.state_layout]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PolicySpec:
        try:
            return cls(
                task=d["task"],
                control_mode=d["control_mode"],
                obs_mode=d["obs_mode"],
                cameras=tuple(CameraSpec(**c) for c in d["cameras"]),
                state_layout=tuple((str(n), int(k)) for n, k in d["state_layout"]),
                action_dim=int(d["action_dim"]),
                action_low=tuple(float(x) for x in d["action_low"]),
                action_high=tuple(float(x) for x in d["action_high"]),
                control_hz=float(d["control_hz"]),
                instruction=str(d["instruction"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"malformed policy spec: {e!r}") from None

    def differences(self, other: PolicySpec, ignore: tuple[str, ...] = ("task", "instruction")) -> list[str]:
        """Human-readable list of fields that differ (task and instruction may differ across tasks)."""
        out = []
        for f in fields(self):
            if f.name in ignore:
                continue
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a != b:
                out.append(f"{f.name}: policy has {_short(a)}, environment has {_short(b)}")
        return out


def _short(v: object) -> str:
    s = repr(v)
    return s if len(s) < 120 else s[:117] + "..."


@dataclass
class CameraOverride:
    """A camera placed and shaped like a calibrated real one (OpenCV intrinsics, SAPIEN-convention pose)."""

    pose: list[float] | None = None  # [x, y, z, qw, qx, qy, qz] in the world frame, SAPIEN camera axes
    intrinsic: list[list[float]] | None = None  # 3x3 K at (width, height)
    fov: float | None = None  # vertical field of view in radians, alternative to intrinsic
    width: int | None = None
    height: int | None = None

    def to_sensor_config(self) -> dict:
        cfg: dict = {}
        if self.pose is not None:
            if len(self.pose) != 7:
                raise UserError("camera pose must be [x, y, z, qw, qx, qy, qz]")
            cfg["pose"] = [float(x) for x in self.pose]
        if self.intrinsic is not None and self.fov is not None:
            raise UserError("give a camera either an intrinsic matrix or a fov, not both")
        if self.intrinsic is not None:
            import numpy as np

            k = np.asarray(self.intrinsic, dtype=np.float64)
            if k.shape != (3, 3):
                raise UserError(f"camera intrinsic must be 3x3, got shape {k.shape}")
            cfg["intrinsic"] = k
            cfg["fov"] = None
        if self.fov is not None:
            cfg["fov"] = float(self.fov)
            cfg["intrinsic"] = None
        if self.width is not None:
            cfg["width"] = int(self.width)
        if self.height is not None:
            cfg["height"] = int(self.height)
        return cfg


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
