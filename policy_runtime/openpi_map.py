"""The key map of `policy-runtime serve --openpi-map`: an openpi client's observation keys -> this export's inputs.

An openpi robot script sends a flat map whose keys depend on its robot (`observation/image`,
`observation/state`, `prompt`, ...). The map says which key feeds each camera of the contract, how the
state vector is assembled block by block from slices of client keys (with optional scale and offset, and
constants or zeros for what the client does not send), and which key holds the instruction. Images are turned into
the contract's HWC uint8 frames (channel-first and float [0, 1] accepted, resized with padding to keep
the aspect ratio). A map is checked when the server starts, against the export's contract; every
problem is one line naming the file and the entry. A request the map cannot convert is a ProtocolError
the client receives as openpi's error message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from policy_runtime.errors import UserError
from policy_runtime.protocol import (
    BAD_DTYPE,
    BAD_MESSAGE,
    BAD_SHAPE,
    BAD_TYPE,
    MISSING_FIELD,
    NON_FINITE,
    UINT8,
    Contract,
    ProtocolError,
)
from policy_runtime.yaml_io import load_yaml_mapping

MAP_VERSION = 1
ZEROS = "zeros"  # a state block (or a part of one) the client does not send
CONSTANT = "constant"
MAP_FIELDS = {"version", "images", "state", "instruction"}
PART_FIELDS = {"key", "slice", "scale", "offset"}


@dataclass(frozen=True)
class StatePart:
    """Values for one stretch of a state block: client key[start:stop] * scale + offset, or constants."""

    key: str | None = None
    start: int | None = None
    stop: int | None = None
    scale: float = 1.0
    offset: float = 0.0
    constant: tuple[float, ...] = ()  # the values themselves, when key is None

    @property
    def size(self) -> int | None:
        """How many values the part gives, when the map alone says it (None: the client's array decides)."""
        if self.key is None:
            return len(self.constant)
        return None if self.stop is None else self.stop - (self.start or 0)

    def values(self, obs: dict) -> np.ndarray:
        if self.key is None:
            return np.asarray(self.constant, np.float64)
        v = _numbers(_get(obs, self.key), self.key)
        start, stop = self.start or 0, len(v) if self.stop is None else self.stop
        if stop > len(v):
            raise ProtocolError(BAD_SHAPE, f"{self.key!r} has {len(v)} values; the map takes [{start}, {stop})")
        return v[start:stop] * self.scale + self.offset

    def to_dict(self) -> dict:
        if self.key is None:
            return {CONSTANT: list(self.constant)}
        d: dict[str, Any] = {"key": self.key}
        if self.start is not None or self.stop is not None:
            d["slice"] = [self.start or 0, self.stop]
        if self.scale != 1.0 or self.offset != 0.0:
            d.update(scale=self.scale, offset=self.offset)
        return d


@dataclass(frozen=True)
class OpenpiMap:
    images: dict[str, str]                        # contract camera -> client key
    state: dict[str, tuple[StatePart, ...]]       # contract state block -> its parts, concatenated; (): zeros
    instruction: str | None = "prompt"            # client key of the text; None: always the export's default
    source: str = "default map"

    @classmethod
    def default(cls, contract: Contract) -> OpenpiMap:
        """Without --openpi-map: `observation/<camera>` per camera, the whole vector in `observation/state`."""
        blocks, offset = {}, 0
        for name, size in contract.state_layout:
            blocks[name] = (StatePart("observation/state", offset, offset + size),)
            offset += size
        return cls({c.name: f"observation/{c.name}" for c in contract.cameras}, blocks)

    def check(self, contract: Contract) -> OpenpiMap:
        """Every camera and state block of the contract fed, nothing else named, fixed sizes that fit; returns self."""
        where = self.source
        cams = [c.name for c in contract.cameras]
        _same_names(where, "images", "camera", list(self.images), cams)
        sizes = dict(contract.state_layout)
        _same_names(where, "state", "state block", list(self.state), list(sizes))
        for block, parts in self.state.items():
            if parts and all(p.size is not None for p in parts):  # every size known now
                n = sum(p.size for p in parts)
                if n != sizes[block]:
                    raise UserError(f"{where}: state.{block} gives {n} values; the export's block has {sizes[block]}")
        return self

    def to_dict(self) -> dict:
        """The map as the server reports it to clients (metadata) and in its log."""
        return {"version": MAP_VERSION, "images": dict(self.images),
                "state": {b: [p.to_dict() for p in parts] if parts else ZEROS for b, parts in self.state.items()},
                "instruction": self.instruction}

    def convert(self, obs: Any, contract: Contract) -> tuple[dict[str, np.ndarray], np.ndarray, str | None]:
        """(images, state, instruction) of our infer request from one openpi observation."""
        if not isinstance(obs, dict):
            raise ProtocolError(BAD_MESSAGE, f"an observation must be a map of key -> value, got {type(obs).__name__}")
        images = {c.name: to_frame(_get(obs, self.images[c.name]), self.images[c.name], c.height, c.width)
                  for c in contract.cameras}
        blocks = []
        for name, size in contract.state_layout:
            parts = self.state[name]
            v = np.concatenate([p.values(obs) for p in parts]) if parts else np.zeros(size)
            if v.size != size:
                raise ProtocolError(BAD_SHAPE, f"state block {name} needs {size} values; the map's keys gave {v.size}")
            blocks.append(v)
        state = np.concatenate(blocks).astype(np.float32) if blocks else np.zeros(0, np.float32)
        instruction = obs.get(self.instruction) if self.instruction is not None else None
        if instruction is not None and not isinstance(instruction, str):
            raise ProtocolError(BAD_TYPE, f"{self.instruction!r} must be text, got {type(instruction).__name__}")
        return images, state, instruction


# ----- conversion of one request -------------------------------------------------------------------------------------
def _get(obs: dict, key: str) -> Any:
    if key not in obs:
        have = sorted(str(k) for k in obs)[:12]
        raise ProtocolError(MISSING_FIELD, f"observation has no key {key!r} (the server's key map reads it); "
                            f"it has {have}")
    return obs[key]


def _numbers(value: Any, key: str) -> np.ndarray:
    """A client's numeric value (array, numpy scalar, number or list of numbers) as a flat float64 vector."""
    if isinstance(value, list) and not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        raise ProtocolError(BAD_TYPE, f"{key!r} must be numbers")
    if not isinstance(value, (np.ndarray, np.generic, int, float, list)) or isinstance(value, bool):
        raise ProtocolError(BAD_TYPE, f"{key!r} must be a numeric array, got {type(value).__name__}")
    a = np.asarray(value)
    if a.dtype.kind not in "iuf":
        raise ProtocolError(BAD_DTYPE, f"{key!r} has dtype {a.dtype}; a number type is needed")
    if a.ndim > 1:
        raise ProtocolError(BAD_SHAPE, f"{key!r} has shape {list(a.shape)}; a vector is needed")
    return a.astype(np.float64).reshape(-1)


def to_frame(value: Any, key: str, height: int, width: int) -> np.ndarray:
    """An HWC uint8 RGB frame of height x width from [H, W, 3] or [3, H, W], uint8 or float in [0, 1].

    A frame of another aspect ratio is resized into the middle of the target and padded with black (openpi
    clients resize this way too), so the scene is never stretched.
    """
    if not isinstance(value, np.ndarray) or value.ndim != 3:
        got = list(value.shape) if isinstance(value, np.ndarray) else type(value).__name__
        raise ProtocolError(BAD_SHAPE, f"{key!r} must be an image array [H, W, 3] or [3, H, W], got {got}")
    img = value if value.shape[2] == 3 else np.moveaxis(value, 0, 2) if value.shape[0] == 3 else None
    if img is None or min(img.shape[:2]) < 1:
        raise ProtocolError(BAD_SHAPE, f"{key!r} has shape {list(value.shape)}; expected [H, W, 3] or [3, H, W]")
    if img.dtype.kind == "f":
        if not np.isfinite(img).all():
            raise ProtocolError(NON_FINITE, f"{key!r} contains NaN or Inf")
        img = np.clip(np.rint(img.astype(np.float32) * 255.0), 0, 255).astype(UINT8)
    elif img.dtype != UINT8:
        raise ProtocolError(BAD_DTYPE, f"{key!r} has dtype {img.dtype}; images are uint8 or float in [0, 1]")
    return _fit(np.ascontiguousarray(img), height, width)


def _fit(img: np.ndarray, height: int, width: int) -> np.ndarray:
    h, w = img.shape[:2]
    if (h, w) == (height, width):
        return img
    scale = min(height / h, width / w)
    nh, nw = max(1, min(height, round(h * scale))), max(1, min(width, round(w * scale)))
    resized = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    if (nh, nw) == (height, width):
        return resized
    out = np.zeros((height, width, 3), UINT8)
    top, left = (height - nh) // 2, (width - nw) // 2
    out[top:top + nh, left:left + nw] = resized
    return out


# ----- loading and checking a map file -------------------------------------------------------------------------------
def load_openpi_map(path: str | Path) -> OpenpiMap:
    """Parse a map file; every problem is one UserError line naming the file and the entry."""
    d = load_yaml_mapping(path, "openpi map")
    where = f"openpi map {path}"
    unknown = sorted(str(k) for k in d if k not in MAP_FIELDS)
    if unknown:
        raise UserError(f"{where}: unknown field(s) {unknown}; allowed {sorted(MAP_FIELDS)}")
    if d.get("version", MAP_VERSION) != MAP_VERSION:
        raise UserError(f"{where}: version {d.get('version')!r} is not supported (this runtime reads {MAP_VERSION})")
    images = d.get("images") or {}
    if not isinstance(images, dict) or not all(_is_key(k) and _is_key(v) for k, v in images.items()):
        raise UserError(f"{where}: images must map each camera name to a client key (text)")
    state = d.get("state")
    if not isinstance(state, dict) or not all(_is_key(k) for k in state):
        raise UserError(f"{where}: state must map each state block of the export to its parts (a list) or 'zeros'")
    instruction = d.get("instruction", "prompt")
    if instruction is not None and not _is_key(instruction):
        raise UserError(f"{where}: instruction must be a client key (text) or null")
    blocks = {name: _block(where, name, spec) for name, spec in state.items()}
    return OpenpiMap(dict(images), blocks, instruction, where)


def _is_key(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


def _is_finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _block(where: str, name: str, spec: Any) -> tuple[StatePart, ...]:
    if spec == ZEROS:
        return ()  # no parts: the whole block is zeros, whatever its size
    if not isinstance(spec, list) or not spec:
        raise UserError(f"{where}: state.{name} must be a list of parts or 'zeros'")
    return tuple(_part(f"{where}: state.{name}[{i}]", p) for i, p in enumerate(spec))


def _part(where: str, p: Any) -> StatePart:
    if isinstance(p, str) and _is_key(p):
        return StatePart(p)
    if isinstance(p, dict) and set(p) == {ZEROS}:
        n = p[ZEROS]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise UserError(f"{where}: zeros must be a positive whole number, got {n!r}")
        return StatePart(constant=(0.0,) * n)
    if isinstance(p, dict) and set(p) == {CONSTANT}:
        c = p[CONSTANT]
        if not isinstance(c, list) or not c or not all(_is_finite(x) for x in c):
            raise UserError(f"{where}: constant must be a non-empty list of finite numbers, got {c!r}")
        return StatePart(constant=tuple(float(x) for x in c))
    if not isinstance(p, dict) or not _is_key(p.get("key")) or not set(p) <= PART_FIELDS:
        raise UserError(f"{where}: a part is a client key, {{key: K, slice: [start, stop], scale: s, offset: o}}, "
                        f"{{zeros: N}} or {{constant: [v, ...]}}")
    start = stop = None
    if "slice" in p:
        s = p["slice"]
        if not (isinstance(s, list) and len(s) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in s)
                and 0 <= s[0] < s[1]):
            raise UserError(f"{where}: slice must be [start, stop] with 0 <= start < stop, got {s!r}")
        start, stop = s
    numbers = {}
    for field, default in (("scale", 1.0), ("offset", 0.0)):
        v = p.get(field, default)
        if not _is_finite(v):
            raise UserError(f"{where}: {field} must be a finite number, got {v!r}")
        numbers[field] = float(v)
    return StatePart(p["key"], start, stop, **numbers)


def _same_names(where: str, field: str, what: str, given: list[str], needed: list[str]) -> None:
    missing = [n for n in needed if n not in given]
    if missing:
        raise UserError(f"{where}: {field} does not feed the export's {what}(s) {missing} (the export needs "
                        f"{needed}; write '{ZEROS}' for a state block the client does not send)")
    unknown = [n for n in given if n not in needed]
    if unknown:
        raise UserError(f"{where}: {field} names {what}(s) {unknown} the export does not have (it has {needed})")
