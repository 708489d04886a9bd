"""Model sizes and the chunking/sampling settings that travel with a checkpoint."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields

from sim_trainer.errors import UserError

SIZES: dict[str, dict] = {
    # well under 2 M parameters: unit tests
    "tiny": dict(d_model=32, n_heads=2, prefix_layers=1, expert_layers=1, cnn_channels=(8, 16, 32)),
    # CPU training (about 1.5 M parameters, about 6 MB)
    "small": dict(d_model=128, n_heads=4, prefix_layers=2, expert_layers=3, cnn_channels=(32, 64, 128)),
    # GPU training
    "base": dict(d_model=384, n_heads=6, prefix_layers=4, expert_layers=6, cnn_channels=(64, 128, 256), image_grid=8),
}


@dataclass
class ModelConfig:
    size: str
    d_model: int
    n_heads: int
    prefix_layers: int
    expert_layers: int
    cnn_channels: tuple[int, ...]
    camera_names: tuple[str, ...]
    image_size: int
    state_dim: int
    action_dim: int
    horizon: int = 16  # H: actions per chunk
    exec_steps: int = 8  # C: actions executed before asking again
    num_steps: int = 10  # K: default denoising steps at inference
    max_text_len: int = 48
    text_patch: int = 4  # byte tokens are grouped this many to a prefix token (48 bytes -> 12 tokens)
    image_grid: int = 4  # each camera becomes image_grid x image_grid prefix tokens
    mlp_ratio: int = 4
    shortcut: bool = False  # velocity also conditioned on the step size d (shortcut models); old checkpoints: off
    velocity_gate: bool = False  # v = z(features) * v, z in (0, 2): SAC Flow's Flow-G on this model (sac_flow)
    velocity_decoder: bool = False  # v = v + decoder(features, prefix): SAC Flow's Flow-T on this model (sac_flow)

    @classmethod
    def from_size(cls, size: str, **kwargs) -> ModelConfig:
        if size not in SIZES:
            raise UserError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)}")
        return cls(size=size, **{**SIZES[size], **kwargs}).validate()

    def validate(self) -> ModelConfig:
        if self.horizon < 1 or self.exec_steps < 1:
            raise UserError("horizon and exec_steps must be positive")
        if self.exec_steps > self.horizon:
            raise UserError(f"exec_steps C={self.exec_steps} cannot exceed the chunk horizon H={self.horizon}")
        if self.num_steps < 1:
            raise UserError(f"number of denoising steps must be >= 1, got {self.num_steps}")
        if self.max_text_len % self.text_patch:
            raise UserError("max_text_len must be a multiple of text_patch")
        if self.d_model % self.n_heads:
            raise UserError("d_model must be divisible by n_heads")
        if self.velocity_gate and self.velocity_decoder:
            raise UserError("a model has a velocity gate (Flow-G) or a velocity decoder (Flow-T), not both")
        return self

    def to_dict(self) -> dict:
        """config.json's model entry; a plain model's has no `shortcut`, `velocity_gate` or `velocity_decoder` key,
        as before these existed (so older software still reads it)."""
        d = asdict(self)
        for flag in BOOL_FIELDS:
            if not d[flag]:
                del d[flag]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """A config read from a checkpoint's config.json: every field's type and range is checked first."""
        if not isinstance(d, dict):
            raise UserError(f"model config must be a mapping, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise UserError(f"unknown model config keys: {sorted(unknown)}")
        missing = sorted(f.name for f in fields(cls) if f.name not in d and f.default is MISSING)
        if missing:
            raise UserError(f"model config is missing {', '.join(missing)}")
        d = dict(d)
        if not isinstance(d["size"], str):
            raise UserError(f"model config size must be a string, got {d['size']!r}")
        for name in INT_FIELDS:
            if name in d and not (name == "image_size" and d[name] == 0 and not d.get("camera_names")):
                _check_int(d[name], name)  # (a state-only model has no cameras and image_size 0)
        for flag in BOOL_FIELDS:
            if not isinstance(d.get(flag, False), bool):
                raise UserError(f"model config {flag} must be true or false, got {d[flag]!r}")
        for name in ("cnn_channels", "camera_names"):
            if not isinstance(d[name], list):
                raise UserError(f"model config {name} must be a list, got {d[name]!r}")
            d[name] = tuple(d[name])
        if not d["cnn_channels"]:
            raise UserError("model config cnn_channels must not be empty")
        for c in d["cnn_channels"]:
            _check_int(c, "cnn_channels")
        names = d["camera_names"]
        if not all(isinstance(c, str) for c in names) or len(set(names)) != len(names):
            raise UserError(f"model config camera_names must be distinct strings, got {list(names)!r}")
        return cls(**d).validate()


# Integer fields (and the largest value a model this code builds may have: a typo must not exhaust memory).
INT_FIELDS = ("d_model", "n_heads", "prefix_layers", "expert_layers", "image_size", "state_dim", "action_dim",
              "horizon", "exec_steps", "num_steps", "max_text_len", "text_patch", "image_grid", "mlp_ratio")
MAX_INT_FIELD = 4096
BOOL_FIELDS = ("shortcut", "velocity_gate", "velocity_decoder")


def _check_int(v: object, name: str) -> None:
    if type(v) is not int or not 1 <= v <= MAX_INT_FIELD:
        raise UserError(f"model config {name} must be a whole number in 1..{MAX_INT_FIELD}, got {v!r}")
