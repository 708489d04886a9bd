"""Model sizes and the chunking/sampling settings that travel with a checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

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
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise UserError(f"unknown model config keys: {sorted(unknown)}")
        try:
            d = dict(d)
            d["cnn_channels"] = tuple(d["cnn_channels"])
            d["camera_names"] = tuple(d["camera_names"])
            return cls(**d).validate()
        except (KeyError, TypeError) as e:
            raise UserError(f"malformed model config: {e}") from None
