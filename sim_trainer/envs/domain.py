"""Domain shifts: the same ManiSkill task with another look and feel, e.g. the "real-proxy" domain.

Without a robot, a shifted copy of the simulator stands in for the real world in sim-real co-training
(RL-Co): its demos play the role of real demos, its success rate the role of real success. A
`DomainShift` changes what a real setup changes: lighting, colours, a small camera calibration error,
friction and mass, one control step of action latency, and sensor noise.

Appearance and physics are set while the scene is built (a subclass of the task's env class hooks
`_load_scene`, `_load_lighting` and the camera configs), before PhysX and the renderer are set up, so
they hold on both the CPU and the GPU backend and survive every reset. Latency and noise act per step
in `DomainShiftWrapper`. The shifts are constants; the noise is drawn from a generator seeded by the
episode seed, so an episode replays exactly.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, fields, replace

import gymnasium as gym
import numpy as np
import torch

from policy_runtime.yaml_io import load_yaml_mapping
from sim_trainer.errors import UserError

REAL_PROXY = "real_proxy"  # name of the built-in preset (configs/domain_real_proxy.yaml spells it out)
_NOISE_SALT = 0x5EA1  # decorrelates the observation noise from the task's own use of the episode seed

RGB = tuple[float, float, float]


@dataclass(frozen=True)
class DomainShift:
    """One domain, as a change relative to the default ManiSkill scene. The defaults are the real-proxy domain."""

    # Lighting: every light (ambient and directional) is multiplied by intensity * colour. Lab lighting is
    # dimmer than the sim's 1.0 white and warm (LED/halogen, ~3500-4000 K).
    light_intensity: float = 0.8
    light_color: RGB = (1.0, 0.93, 0.82)
    # Table: per-channel multiplier of its texture (albedo), i.e. a lighter, greyer tabletop than the sim's wood.
    table_rgb_scale: RGB = (0.85, 0.95, 1.1)
    # Objects (every dynamic actor, e.g. the cubes): added to their RGB colour in [0, 1], then clipped. An
    # offset, not a factor, because the cubes are saturated primaries whose zero channels a factor cannot
    # move; small enough that a red cube still reads as the red cube of the instruction.
    object_rgb_shift: RGB = (0.08, 0.06, -0.04)
    # Camera calibration error, applied to every task camera (after any calibrated override): a translation
    # in the world frame (metres) and a rotation about the camera's own x, y, z axes (degrees). A good
    # hand-eye calibration is off by a few millimetres and under a degree; this is ~9 mm and ~0.9 deg.
    camera_position_offset: tuple[float, float, float] = (0.006, -0.005, 0.004)
    camera_rotation_offset_deg: tuple[float, float, float] = (0.5, -0.6, 0.4)
    # Friction: static and dynamic friction of the table, floor and objects times this (PhysX averages the
    # two surfaces of a contact, so object-table friction scales by it too; the robot's fingers keep theirs).
    friction_scale: float = 1.3
    # Mass (and inertia) of every object times this: a solid printed or wooden cube instead of the sim's 64 g.
    object_mass_scale: float = 1.5
    # Control steps between sending an action and the robot executing it (0 or 1): one 50 ms step at 20 Hz
    # is typical of a driver plus network round trip. The robot executes the previous action; the first
    # action of an episode is executed on the first two steps (no earlier command exists).
    action_latency_steps: int = 1
    # Gaussian noise on every entry of the state observation (joint positions/velocities, poses) and on camera
    # pixels (0-255 scale): between encoder jitter (~1e-4 rad) and a camera pose estimate (mm), and colour-sensor
    # noise in indoor light. Independent per entry, so near-constant entries (the TCP quaternion's w) get more
    # noise than forward kinematics would give them.
    state_noise_std: float = 0.001
    image_noise_std: float = 3.0

    def validate(self, where: str = "domain") -> DomainShift:
        checks = [
            ("light_intensity", 0.0 < self.light_intensity <= 5.0, "be in (0, 5]"),
            ("light_color", all(0.0 <= c <= 2.0 for c in self.light_color), "have channels in [0, 2]"),
            ("table_rgb_scale", all(0.0 <= c <= 2.0 for c in self.table_rgb_scale), "have channels in [0, 2]"),
            ("object_rgb_shift", all(-1.0 <= c <= 1.0 for c in self.object_rgb_shift), "have channels in [-1, 1]"),
            ("camera_position_offset", all(abs(c) <= 0.05 for c in self.camera_position_offset),
             "stay within 0.05 m per axis (a calibration error, not a new camera)"),
            ("camera_rotation_offset_deg", all(abs(c) <= 5.0 for c in self.camera_rotation_offset_deg),
             "stay within 5 degrees per axis"),
            ("friction_scale", 0.0 < self.friction_scale <= 5.0, "be in (0, 5]"),
            ("object_mass_scale", 0.0 < self.object_mass_scale <= 10.0, "be in (0, 10]"),
            ("action_latency_steps", self.action_latency_steps in (0, 1), "be 0 or 1"),
            ("state_noise_std", 0.0 <= self.state_noise_std <= 0.1, "be in [0, 0.1]"),
            ("image_noise_std", 0.0 <= self.image_noise_std <= 50.0, "be in [0, 50]"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise UserError(f"{where}: {name} must {rule}, got {getattr(self, name)!r}")
        return self

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict, where: str = "domain") -> DomainShift:
        """Fields given override the real-proxy defaults; unknown keys and malformed values are a UserError."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
        values = {}
        for name, value in data.items():
            default = getattr(cls, name)
            values[name] = _coerce(value, default, f"{where}: {name}")
        return cls(**values).validate(where)


def _coerce(value: object, default: object, what: str) -> object:
    """Convert a YAML value to the type of the field's default (int, float or a 3-tuple of floats)."""
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(default):
            raise UserError(f"{what} must be a list of {len(default)} numbers, got {value!r}")
        return tuple(_coerce(v, 0.0, what) for v in value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{what} must be a finite number, got {value!r}")
    if isinstance(default, int):
        if value != int(value):
            raise UserError(f"{what} must be a whole number, got {value!r}")
        return int(value)
    return float(value)


def load_domain(name_or_path: str) -> DomainShift:
    """`real_proxy` (the built-in defaults) or a YAML file of DomainShift fields."""
    if name_or_path == REAL_PROXY:
        return DomainShift()
    data = load_yaml_mapping(name_or_path, what=f"domain (a YAML file or {REAL_PROXY!r})")
    return DomainShift.from_dict(data, where=f"domain {name_or_path}")


# ---------------------------------------------------------------------------------------------------------
# Scene-build hooks: appearance, camera and physics
# ---------------------------------------------------------------------------------------------------------


def _offset_pose(raw_pose: np.ndarray, shift: DomainShift) -> np.ndarray:
    """[x, y, z, qw, qx, qy, qz] moved by the calibration error (rotation about the camera's own axes)."""
    from transforms3d.euler import euler2quat
    from transforms3d.quaternions import qmult

    q_err = euler2quat(*np.deg2rad(shift.camera_rotation_offset_deg), axes="sxyz")
    raw = np.asarray(raw_pose, dtype=np.float64).reshape(-1, 7)
    out = [np.r_[p[:3] + np.asarray(shift.camera_position_offset), qmult(p[3:], q_err)] for p in raw]
    return np.stack(out)


def _tint_materials(actor, fn) -> None:
    """Apply fn(RGB array in [0, 1]) to every render material of a ManiSkill actor, texture or flat colour."""
    import sapien

    for entity in actor._objs:
        body = entity.find_component_by_type(sapien.render.RenderBodyComponent)
        if body is None:
            continue
        for shape in body.render_shapes:
            for part in shape.parts:
                mat = part.material
                tex = mat.base_color_texture
                if tex is not None:  # the texture replaces the base colour in SAPIEN's shader
                    arr = tex.download()
                    rgb = fn(arr[..., :3].astype(np.float32) / 255.0)
                    arr = np.concatenate([np.round(rgb * 255.0).astype(np.uint8), arr[..., 3:]], axis=-1)
                    mat.base_color_texture = sapien.render.RenderTexture2D(arr, tex.format, srgb=tex.is_srgb)
                else:
                    color = np.asarray(mat.base_color, dtype=np.float32)
                    mat.base_color = [*fn(color[:3]).tolist(), float(color[3])]


def _shift_scene(scene, shift: DomainShift) -> None:
    """Colours, friction and mass of the loaded actors (table, floor, objects); the robot is untouched."""
    import sapien

    table_scale = np.asarray(shift.table_rgb_scale, dtype=np.float32)
    obj_shift = np.asarray(shift.object_rgb_shift, dtype=np.float32)
    render = scene.can_render()
    for name, actor in scene.actors.items():
        dynamic = actor.px_body_type == "dynamic"
        if render and name.startswith("table"):
            _tint_materials(actor, lambda rgb: np.clip(rgb * table_scale, 0.0, 1.0))
        elif render and dynamic:
            _tint_materials(actor, lambda rgb: np.clip(rgb + obj_shift, 0.0, 1.0))
        for entity in actor._objs:
            body = entity.find_component_by_type(sapien.physx.PhysxRigidBaseComponent)
            if body is None:
                continue
            for shape in body.collision_shapes:  # a new material each: the default one is shared with the robot
                m = shape.physical_material
                shape.physical_material = sapien.physx.PhysxMaterial(
                    m.static_friction * shift.friction_scale, m.dynamic_friction * shift.friction_scale,
                    m.restitution)
            if dynamic and isinstance(body, sapien.physx.PhysxRigidDynamicComponent):
                body.mass = body.mass * shift.object_mass_scale
                body.inertia = np.asarray(body.inertia) * shift.object_mass_scale


def _shift_lights(scene, shift: DomainShift) -> None:
    import sapien

    gain = shift.light_intensity * np.asarray(shift.light_color, dtype=np.float32)
    scene.set_ambient_light((np.asarray(scene.ambient_light, dtype=np.float32) * gain).tolist())
    for sub in scene.sub_scenes:
        for entity in sub.entities:
            for comp in entity.components:
                if isinstance(comp, sapien.render.RenderLightComponent):
                    comp.color = (np.asarray(comp.color, dtype=np.float32) * gain).tolist()


@functools.cache
def shifted_env_class(base: type) -> type:
    """A subclass of a ManiSkill task that builds its scene in a shifted domain (kwarg `domain_shift`)."""
    from mani_skill.sensors.camera import parse_camera_configs
    from mani_skill.utils.structs import Pose

    class Shifted(base):
        def __init__(self, *args, domain_shift: DomainShift, **kwargs):
            self.domain_shift = domain_shift
            cams = dict(kwargs.get("sensor_configs") or {})
            for name, cfg in cams.items():  # a calibrated camera override is shifted like the default camera
                if isinstance(cfg, dict) and cfg.get("pose") is not None:
                    cams[name] = {**cfg, "pose": _offset_pose(cfg["pose"], domain_shift)[0].tolist()}
            kwargs["sensor_configs"] = cams
            super().__init__(*args, **kwargs)

        @property
        def _default_sensor_configs(self):
            configs = parse_camera_configs(super()._default_sensor_configs)
            for cfg in configs.values():
                raw = _offset_pose(cfg.pose.raw_pose.cpu().numpy(), self.domain_shift)
                cfg.pose = Pose.create_from_pq(p=raw[:, :3], q=raw[:, 3:])
            return list(configs.values())

        def _load_scene(self, options: dict):
            super()._load_scene(options)
            _shift_scene(self.scene, self.domain_shift)

        def _load_lighting(self, options: dict):
            super()._load_lighting(options)
            _shift_lights(self.scene, self.domain_shift)

    Shifted.__name__ = Shifted.__qualname__ = f"{base.__name__}Shifted"
    return Shifted


def _build_shifted(env_id: str, domain_shift: DomainShift, **kwargs):
    from mani_skill.utils.registration import REGISTERED_ENVS

    spec = REGISTERED_ENVS[env_id]
    return shifted_env_class(spec.cls)(domain_shift=domain_shift, **{**spec.default_kwargs, **kwargs})


def make_shifted_env(env_id: str, shift: DomainShift, **make_kwargs) -> gym.Env:
    """gym.make(env_id, **make_kwargs) in the shifted domain: the same wrapper stack, a shifted task class."""
    import mani_skill.envs  # noqa: F401  (registers the tasks)

    spec = replace(gym.spec(env_id), entry_point=functools.partial(_build_shifted, env_id, shift))
    env = gym.make(spec, **make_kwargs)
    if shift.action_latency_steps or shift.state_noise_std or shift.image_noise_std:
        env = DomainShiftWrapper(env, shift)
    return env


# ---------------------------------------------------------------------------------------------------------
# Per-step shifts: latency and noise
# ---------------------------------------------------------------------------------------------------------


class DomainShiftWrapper(gym.Wrapper):
    """Action latency and observation noise on a (batched) ManiSkill env with raw dict observations."""

    def __init__(self, env: gym.Env, shift: DomainShift):
        super().__init__(env)
        self.shift = shift
        base = env.unwrapped
        self._device = base.device
        self._pending: torch.Tensor | None = None  # the action sent last step, executed this step
        self._fresh = torch.ones(base.num_envs, dtype=torch.bool, device=self._device)
        self._gen = torch.Generator(device=self._device)

    def reset(self, *, seed=None, options=None):
        raw, info = self.env.reset(seed=seed, options=options)
        base = self.env.unwrapped
        idx = (options or {}).get("env_idx")
        reset_idx = torch.arange(base.num_envs) if idx is None else torch.as_tensor(idx).cpu()
        self._fresh[reset_idx.to(self._device)] = True
        seeds = np.asarray(base._episode_seed).reshape(-1)[reset_idx.numpy()]
        self._gen.manual_seed(int(np.random.SeedSequence([_NOISE_SALT, *map(int, seeds)]).generate_state(1)[0]))
        return self._noisy(raw), info

    def step(self, action):
        if self.shift.action_latency_steps:
            sent = torch.as_tensor(action, dtype=torch.float32, device=self._device).reshape(len(self._fresh), -1)
            pending = sent if self._pending is None else self._pending
            action = torch.where(self._fresh[:, None], sent, pending)
            self._pending = sent.clone()
            self._fresh[:] = False
        raw, reward, terminated, truncated, info = self.env.step(action)
        return self._noisy(raw), reward, terminated, truncated, info

    def _noisy(self, raw):
        if not isinstance(raw, dict):
            return raw
        out = dict(raw)
        if self.shift.state_noise_std:
            for group in ("agent", "extra"):
                if group in raw:
                    out[group] = {k: self._add_noise(v, self.shift.state_noise_std) for k, v in raw[group].items()}
        if self.shift.image_noise_std and "sensor_data" in raw:
            out["sensor_data"] = {
                cam: {k: self._noisy_image(v) if k == "rgb" else v for k, v in data.items()}
                for cam, data in raw["sensor_data"].items()}
        return out

    def _add_noise(self, v, std: float):
        if not torch.is_tensor(v) or not v.is_floating_point():
            return v
        return v + std * torch.randn(v.shape, generator=self._gen, device=v.device, dtype=v.dtype)

    def _noisy_image(self, rgb: torch.Tensor) -> torch.Tensor:
        noisy = self._add_noise(rgb.float(), self.shift.image_noise_std)
        return noisy.round().clamp(0, 255).to(rgb.dtype)
