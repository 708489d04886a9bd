"""The policy server's wire format: the single definition used by the server, the client and docs/protocol.md.

Every ZeroMQ message is one msgpack map with a `kind` (the header frame), optionally followed by
attached frames. numpy arrays travel either inline as msgpack ExtType code 1 (a fixed binary header:
dtype string, shape, then raw little-endian C-order bytes) or, when large, as ExtType code 2 in the
header (the same dtype and shape, plus the index of an attached frame holding the raw bytes), so camera
images go out without being copied into the msgpack buffer; pickle is never used. Decoding treats every
byte as hostile: anything malformed raises `ProtocolError` with a specific error code, which the server
turns into an `error` reply instead of dying.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from policy_runtime.contract import ARM_DELTA, GRIPPER_RANGE, TOKENIZER, CameraSpec, ControllerSemantics, PolicySpec

PROTOCOL_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)  # a v1 message is a v2 message without attached frames, so the server speaks both
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"  # loopback: exposing the server is an explicit choice
NDARRAY_EXT = 1        # array inline in the header
FRAME_NDARRAY_EXT = 2  # array whose bytes are an attached frame (protocol 2)
INLINE_MAX_BYTES = 1024  # arrays larger than this (camera images) are sent as attached frames
MAX_NDIM = 32
UINT64_MAX = 2**64 - 1
SEED_MAX = 2**63 - 1

# dtype strings (numpy `dtype.str`) that may travel; everything else (object, void, complex, strings,
# datetimes, big-endian) is refused on both sides.
UINT8, FLOAT32 = np.dtype("uint8"), np.dtype("float32")  # the contract's image and state/action dtypes
ALLOWED_DTYPES = ("|b1", "|u1", "|i1", "<u2", "<i2", "<f2", "<u4", "<i4", "<f4", "<u8", "<i8", "<f8")

# ----- error codes (the `code` field of an `error` reply) --------------------------------------------------------
BAD_FRAME = "bad_frame"                  # bad ZeroMQ envelope, or attached frames not referenced exactly once
MESSAGE_TOO_LARGE = "message_too_large"  # payload over the server's message cap
BAD_MSGPACK = "bad_msgpack"              # payload is not one valid msgpack object
BAD_MESSAGE = "bad_message"              # not a map, or no string `kind`
UNKNOWN_KIND = "unknown_kind"
UNSUPPORTED_VERSION = "unsupported_version"
MISSING_FIELD = "missing_field"
UNKNOWN_FIELD = "unknown_field"
BAD_TYPE = "bad_type"                    # a field has the wrong msgpack type or is out of range
BAD_ARRAY = "bad_array"                  # ndarray ext malformed: unknown dtype, size does not match shape
ARRAY_TOO_LARGE = "array_too_large"
MISSING_CAMERA = "missing_camera"
UNKNOWN_CAMERA = "unknown_camera"
BAD_DTYPE = "bad_dtype"
BAD_SHAPE = "bad_shape"
NON_FINITE = "non_finite"
INSTRUCTION_TOO_LONG = "instruction_too_long"
OVERLOADED = "overloaded"                # pending queue full: retry later with a fresh observation
EXPIRED = "expired"                      # waited longer than the request's timeout_ms in the queue
NON_FINITE_OUTPUT = "non_finite_output"  # the model produced NaN/Inf: never sent as actions
INTERNAL = "internal"
SHUTTING_DOWN = "shutting_down"

ERROR_CODES = (BAD_FRAME, MESSAGE_TOO_LARGE, BAD_MSGPACK, BAD_MESSAGE, UNKNOWN_KIND, UNSUPPORTED_VERSION,
               MISSING_FIELD, UNKNOWN_FIELD, BAD_TYPE, BAD_ARRAY, ARRAY_TOO_LARGE, MISSING_CAMERA, UNKNOWN_CAMERA,
               BAD_DTYPE, BAD_SHAPE, NON_FINITE, INSTRUCTION_TOO_LONG, OVERLOADED, EXPIRED, NON_FINITE_OUTPUT,
               INTERNAL, SHUTTING_DOWN)


class ProtocolError(Exception):
    """A message that breaks the wire format or the contract; `code` is one of ERROR_CODES."""

    def __init__(self, code: str, message: str, request_id: int | None = None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.request_id = code, message, request_id


@dataclass(frozen=True)
class Limits:
    """Caps applied while decoding untrusted bytes (the server's flood/oversize protection)."""

    max_message_bytes: int = 64 << 20
    max_array_bytes: int = 16 << 20
    max_items: int = 4096  # longest msgpack array/map accepted
    max_frames: int = 64   # attached frames per message


# ----- ndarray <-> ExtType ------------------------------------------------------------------------------------------
def _wire_array(a: Any) -> np.ndarray:
    """A little-endian, C-contiguous array of an allowed dtype (what goes on the wire), or TypeError."""
    a = np.asarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    if a.dtype.str not in ALLOWED_DTYPES:
        raise TypeError(f"dtype {a.dtype} cannot be sent (allowed: {', '.join(ALLOWED_DTYPES)})")
    if a.ndim > MAX_NDIM:
        raise TypeError(f"{a.ndim} dimensions; at most {MAX_NDIM}")
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)  # (ascontiguousarray makes 0-d arrays 1-d)


def _array_head(a: np.ndarray) -> bytes:
    """u8 len | dtype str | u8 ndim | ndim x u64le dims: the header both array ext types start with."""
    return _head_bytes(a.dtype.str, a.shape)


@functools.lru_cache(maxsize=256)
def _head_bytes(dt: str, shape: tuple[int, ...]) -> bytes:
    return bytes([len(dt)]) + dt.encode("ascii") + bytes([len(shape)]) + struct.pack(f"<{len(shape)}Q", *shape)


def pack_ndarray(a: np.ndarray) -> msgpack.ExtType:
    """ExtType(1, array head | raw C-order little-endian bytes)."""
    a = _wire_array(a)
    # One copy: join the header with a view of the array (tobytes() + concatenation copied twice, and the
    # large temporaries made encode 10x slower than the copy itself).
    body = memoryview(a).cast("B") if a.size else b""
    return msgpack.ExtType(NDARRAY_EXT, b"".join((_array_head(a), body)))


def _parse_head(view: memoryview) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """dtype, shape, byte count and header length of an array ext payload (ProtocolError if malformed)."""
    if len(view) < 2 or len(view) < 2 + view[0]:
        raise ProtocolError(BAD_ARRAY, "ndarray header truncated")
    off = 2 + view[0] + 8 * view[1 + view[0]]
    if len(view) < off:
        raise ProtocolError(BAD_ARRAY, "ndarray shape truncated")
    return (*_checked_head(bytes(view[:off])), off)


@functools.lru_cache(maxsize=1024)  # a robot sends the same few dtypes and shapes all the time
def _checked_head(head: bytes) -> tuple[np.dtype, tuple[int, ...], int]:
    n = head[0]
    dt = head[1:1 + n].decode("ascii", "replace")
    if dt not in ALLOWED_DTYPES:
        raise ProtocolError(BAD_ARRAY, f"dtype {dt!r} not allowed (allowed: {', '.join(ALLOWED_DTYPES)})")
    ndim = head[1 + n]
    if ndim > MAX_NDIM:
        raise ProtocolError(BAD_ARRAY, f"{ndim} dimensions; at most {MAX_NDIM}")
    dtype = np.dtype(dt)
    shape = struct.unpack_from(f"<{ndim}Q", head, 2 + n)
    return dtype, shape, math.prod(shape) * dtype.itemsize


def _array_view(buf: memoryview, off: int, dtype: np.dtype, shape: tuple[int, ...], nbytes: int,
                max_bytes: int) -> np.ndarray:
    """A read-only zero-copy array over buf[off:], whose length must match the shape exactly."""
    if nbytes > max_bytes:
        raise ProtocolError(ARRAY_TOO_LARGE, f"array of shape {list(shape)} {dtype.str} is {nbytes} bytes; cap "
                            f"{max_bytes}")
    if len(buf) - off != nbytes:
        raise ProtocolError(BAD_ARRAY, f"shape {list(shape)} {dtype.str} needs {nbytes} bytes, got {len(buf) - off}")
    out = np.ndarray(shape, dtype, buffer=buf, offset=off) if nbytes else np.zeros(shape, dtype)
    out.flags.writeable = False  # received frames may be writable buffers; nobody should edit them in place
    return out


def checked_array(dt: Any, shape: Any, data: Any, max_bytes: int) -> np.ndarray:
    """A read-only zero-copy array from a peer's dtype string, shape and raw bytes (another wire's array encoding).

    The same rules as ExtType arrays: an allowed dtype, at most MAX_NDIM non-negative dimensions, exactly
    product(shape) x itemsize bytes, at most `max_bytes`; anything else is a ProtocolError.
    """
    if not isinstance(dt, str) or dt not in ALLOWED_DTYPES:
        raise ProtocolError(BAD_ARRAY, f"dtype {str(dt)[:20]!r} not allowed (allowed: {', '.join(ALLOWED_DTYPES)})")
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_NDIM or not all(_is_int(n) and n >= 0 for n in shape):
        raise ProtocolError(BAD_ARRAY, f"shape must be a list of at most {MAX_NDIM} non-negative integers")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(BAD_ARRAY, f"array data must be bytes, got {type(data).__name__}")
    dtype = np.dtype(dt)
    return _array_view(memoryview(data).cast("B"), 0, dtype, tuple(shape), math.prod(shape) * dtype.itemsize,
                       max_bytes)


def unpack_ndarray(data: bytes, max_bytes: int) -> np.ndarray:
    """Inverse of pack_ndarray; a read-only zero-copy view. Raises ProtocolError on anything malformed."""
    view = memoryview(data)
    dtype, shape, nbytes, off = _parse_head(view)
    return _array_view(view, off, dtype, shape, nbytes, max_bytes)


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return pack_ndarray(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__}")


def encode(message: dict) -> bytes:
    """msgpack bytes of one single-frame message (ndarrays become ExtType 1; bin type on; no pickle)."""
    return msgpack.packb(message, default=_default, use_bin_type=True)


def encode_frames(message: dict, inline_max_bytes: int = INLINE_MAX_BYTES) -> list[bytes | memoryview]:
    """[header, *attached]: arrays over inline_max_bytes become ExtType 2 references to attached frames.

    The attached frames are views of the caller's arrays (no copy), so they must not change until sent.
    """
    attached: list[bytes | memoryview] = []

    def default(obj: Any) -> Any:
        if isinstance(obj, np.ndarray) and obj.nbytes > inline_max_bytes:
            a = _wire_array(obj)
            attached.append(memoryview(a).cast("B"))
            return msgpack.ExtType(FRAME_NDARRAY_EXT, _array_head(a) + struct.pack("<I", len(attached) - 1))
        return _default(obj)

    return [msgpack.packb(message, default=default, use_bin_type=True), *attached]


def decode(data: bytes | memoryview, limits: Limits = Limits(), attached: Sequence[Any] = ()) -> Any:
    """Decode one message (header plus attached frames); any failure is a ProtocolError, never another exception.

    Every attached frame must be referenced by exactly one ExtType 2 array; arrays are zero-copy read-only views.
    """
    if len(attached) > limits.max_frames:
        raise ProtocolError(BAD_FRAME, f"{len(attached)} attached frames; at most {limits.max_frames}")
    frames = [memoryview(f).cast("B") for f in attached]
    size = len(data) + sum(len(f) for f in frames)
    if size > limits.max_message_bytes:
        raise ProtocolError(MESSAGE_TOO_LARGE, f"{size} bytes; cap {limits.max_message_bytes}")
    used: set[int] = set()

    def ext_hook(code: int, payload: bytes) -> Any:
        if code == NDARRAY_EXT:
            return unpack_ndarray(payload, limits.max_array_bytes)
        if code != FRAME_NDARRAY_EXT:
            raise ProtocolError(BAD_ARRAY, f"unknown msgpack ext type {code}")
        view = memoryview(payload)
        dtype, shape, nbytes, off = _parse_head(view)
        if len(view) != off + 4:
            raise ProtocolError(BAD_ARRAY, "frame array reference must end with a 4-byte frame index")
        index = struct.unpack_from("<I", view, off)[0]
        if index >= len(frames) or index in used:
            raise ProtocolError(BAD_ARRAY, f"array refers to attached frame {index}, but the message has "
                                f"{len(frames)} attached frame(s){' and it is already used' if index in used else ''}")
        used.add(index)
        return _array_view(frames[index], 0, dtype, shape, nbytes, limits.max_array_bytes)

    try:
        msg = msgpack.unpackb(data, ext_hook=ext_hook, raw=False, strict_map_key=True, timestamp=0,
                              max_str_len=limits.max_message_bytes, max_bin_len=limits.max_message_bytes,
                              max_array_len=limits.max_items, max_map_len=limits.max_items,
                              max_ext_len=limits.max_message_bytes)
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises ExtraData, FormatError, StackError, ValueError, TypeError, ...
        raise ProtocolError(BAD_MSGPACK, f"not a valid msgpack message ({type(e).__name__}: {str(e)[:120]})") from None
    if len(used) != len(frames):
        raise ProtocolError(BAD_FRAME, f"{len(frames) - len(used)} attached frame(s) not referenced by any array",
                            _request_id_hint(msg))
    return msg


PEEK_BYTES = 256  # how much of a header the server reads to learn its kind before deciding to decode it


def peek_kind(data: bytes | memoryview) -> tuple[str | None, int | None]:
    """(kind, request_id) read from the first PEEK_BYTES of a header without decoding the rest; None where unknown.

    Lets the server answer a client over its share with `overloaded` (and its request id) at the cost of a few
    hundred bytes, while still letting hello and ping through. Our encoder puts both fields first.
    """
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=PEEK_BYTES, strict_map_key=True, max_ext_len=0,
                                max_bin_len=PEEK_BYTES, max_str_len=PEEK_BYTES, max_array_len=16, max_map_len=64)
    kind = rid = None
    try:
        unpacker.feed(memoryview(data)[:PEEK_BYTES])
        for _ in range(min(unpacker.read_map_header(), 8)):
            key = unpacker.unpack()
            if key == "kind" or key == "request_id":
                value = unpacker.unpack()
                kind = value if key == "kind" and isinstance(value, str) else kind
                rid = value if key == "request_id" and _is_int(value) and 0 <= value <= UINT64_MAX else rid
            else:
                unpacker.skip()
            if kind is not None and rid is not None:
                break
    except Exception:  # truncated at PEEK_BYTES, not a map, malformed: the full decode (if admitted) reports it
        pass
    return kind, rid


# ----- field checks ---------------------------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _require(msg: dict, key: str, rid: int | None) -> Any:
    if key not in msg:
        raise ProtocolError(MISSING_FIELD, f"field {key!r} is required", rid)
    return msg[key]


def _request_id_hint(msg: Any) -> int | None:
    """The request id of a (possibly invalid) message, when it has a usable one; for error replies."""
    rid = msg.get("request_id") if isinstance(msg, dict) else None
    return rid if _is_int(rid) and 0 <= rid <= UINT64_MAX else None


def _check_fields(msg: dict, allowed: set[str], rid: int | None) -> None:
    if msg.keys() <= allowed:
        return
    extra = sorted(str(k) for k in msg if k not in allowed)
    if extra:
        raise ProtocolError(UNKNOWN_FIELD, f"unknown field(s) {extra}; allowed {sorted(allowed)}", rid)


def _request_id(msg: dict) -> int:
    rid = _require(msg, "request_id", None)
    if not _is_int(rid) or not 0 <= rid <= UINT64_MAX:
        raise ProtocolError(BAD_TYPE, "request_id must be an unsigned 64-bit integer")
    return rid


def _array(v: Any, name: str, dtype: np.dtype, shape: tuple[int, ...], rid: int, finite: bool) -> np.ndarray:
    if not isinstance(v, np.ndarray):
        raise ProtocolError(BAD_TYPE, f"{name} must be an ndarray (ext type {NDARRAY_EXT}), got {type(v).__name__}",
                            rid)
    if v.dtype != dtype:
        raise ProtocolError(BAD_DTYPE, f"{name} has dtype {v.dtype}, expected {dtype}", rid)
    if v.shape != shape:
        raise ProtocolError(BAD_SHAPE, f"{name} has shape {list(v.shape)}, expected {list(shape)}", rid)
    if finite and not np.isfinite(v).all():
        raise ProtocolError(NON_FINITE, f"{name} contains NaN or Inf", rid)
    return v


# ----- contract (the hello reply) -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Contract:
    """What a client must agree with before sending observations; built from the export manifest."""

    model_sha256: str
    backend: str
    provider: str
    horizon: int
    exec_steps: int
    action_dim: int
    num_steps: int
    control_mode: str
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]
    clip_actions: bool
    cameras: tuple[CameraSpec, ...]
    state_dim: int
    state_layout: tuple[tuple[str, int], ...]
    normalisation_sha256: str
    control_hz: float
    text_max_len: int
    default_instruction: str
    task: str = ""
    max_batch: int = 1
    max_array_bytes: int = Limits().max_array_bytes
    rtc: bool = False
    instance: str = ""
    protocol: int = PROTOCOL_VERSION
    action_joints: tuple[str, ...] = ()  # the joint each action dimension drives, in order; () = not stated
    arm_delta: tuple[float, float] = ARM_DELTA          # controller scaling (see contract.ControllerSemantics)
    gripper_range: tuple[float, float] = GRIPPER_RANGE
    obs_mode: str = ""  # the PolicySpec's obs_mode; "" from a server that does not state it
    # the served model's own tokenizer (server side only, never on the wire): "" = the byte rule (TOKENIZER)
    tokenizer_file: str = ""
    prompt: str = ""  # contract.PROMPTS rule applied before tokenizer_file
    text_pad_id: int = 0

    @functools.cached_property
    def camera_names(self) -> frozenset[str]:
        return frozenset(cam.name for cam in self.cameras)

    @property
    def controller(self) -> ControllerSemantics:
        """What the actions mean to the controller: the robot side takes rate, bounds, scaling and joints from here."""
        return ControllerSemantics(self.control_mode, self.action_joints, self.action_low, self.action_high,
                                   self.control_hz, self.arm_delta, self.gripper_range)

    def policy_spec(self) -> PolicySpec:
        """The PolicySpec of the served model (what the robot side records episodes with)."""
        if not self.obs_mode:
            raise ValueError("the server's contract does not state obs_mode (a server older than contract 2)")
        return PolicySpec(self.task, self.control_mode, self.obs_mode,
                          tuple(CameraSpec(c.name, c.height, c.width) for c in self.cameras), self.state_layout,
                          self.action_dim, self.action_low, self.action_high, self.control_hz,
                          self.default_instruction)

    @property
    def instruction_max_bytes(self) -> int:
        """UTF-8 bytes that fit in the token budget (one token is BOS)."""
        return self.text_max_len - 1

    def to_wire(self) -> dict:
        return {
            "protocol": self.protocol, "instance": self.instance, "model_sha256": self.model_sha256,
            "backend": self.backend, "provider": self.provider, "task": self.task,
            "horizon": self.horizon, "exec_steps": self.exec_steps, "action_dim": self.action_dim,
            "num_steps": self.num_steps, "control_hz": self.control_hz,
            "action": {"control_mode": self.control_mode, "low": list(self.action_low),
                       "high": list(self.action_high), "clipped": self.clip_actions,
                       "joints": list(self.action_joints), "arm_delta": list(self.arm_delta),
                       "gripper_range": list(self.gripper_range)},
            "obs_mode": self.obs_mode,
            "cameras": [{"name": c.name, "height": c.height, "width": c.width, "dtype": "uint8", "layout": "HWC RGB"}
                        for c in self.cameras],
            "state": {"dim": self.state_dim, "layout": [[n, k] for n, k in self.state_layout], "dtype": "float32"},
            "normalisation_sha256": self.normalisation_sha256,
            "instruction": {"max_bytes": self.instruction_max_bytes, "max_tokens": self.text_max_len,
                            "default": self.default_instruction,
                            "tokenizer": f"tokenizer.json, {self.prompt} prompt" if self.tokenizer_file
                            else TOKENIZER},
            "max_batch": self.max_batch, "max_array_bytes": self.max_array_bytes, "rtc": self.rtc,
        }

    @classmethod
    def from_wire(cls, d: Any) -> Contract:
        try:
            a, s, ins = d["action"], d["state"], d["instruction"]
            return cls(
                protocol=int(d["protocol"]), instance=str(d["instance"]), model_sha256=str(d["model_sha256"]),
                backend=str(d["backend"]), provider=str(d["provider"]), task=str(d["task"]),
                horizon=int(d["horizon"]), exec_steps=int(d["exec_steps"]), action_dim=int(d["action_dim"]),
                num_steps=int(d["num_steps"]), control_hz=float(d["control_hz"]),
                control_mode=str(a["control_mode"]), action_low=tuple(float(x) for x in a["low"]),
                action_high=tuple(float(x) for x in a["high"]), clip_actions=bool(a["clipped"]),
                action_joints=tuple(str(x) for x in a.get("joints", ())),
                arm_delta=_pair(a.get("arm_delta", ARM_DELTA)),
                gripper_range=_pair(a.get("gripper_range", GRIPPER_RANGE)),
                obs_mode=str(d.get("obs_mode", "")),
                cameras=tuple(CameraSpec(str(c["name"]), int(c["height"]), int(c["width"])) for c in d["cameras"]),
                state_dim=int(s["dim"]), state_layout=tuple((str(n), int(k)) for n, k in s["layout"]),
                normalisation_sha256=str(d["normalisation_sha256"]), text_max_len=int(ins["max_tokens"]),
                default_instruction=str(ins["default"]), max_batch=int(d["max_batch"]),
                max_array_bytes=int(d["max_array_bytes"]), rtc=bool(d["rtc"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(BAD_MESSAGE, f"malformed contract in hello reply ({e!r})") from None


def _pair(v: Any) -> tuple[float, float]:
    lo, hi = (float(x) for x in v)
    return lo, hi


# ----- requests -------------------------------------------------------------------------------------------------------
@dataclass
class HelloRequest:
    request_id: int
    protocol: int
    client: str = ""


@dataclass
class PingRequest:
    request_id: int


@dataclass
class InferRequest:
    """A validated observation; arrays already have the contract's dtypes and shapes."""

    request_id: int
    t_capture: float
    images: dict[str, np.ndarray]
    state: np.ndarray
    instruction: str | None = None
    noise_seed: int | None = None
    prev_chunk: np.ndarray | None = None
    delay_steps: int | None = None
    timeout_ms: float | None = None


INFER_FIELDS = {"kind", "request_id", "t_capture", "images", "state", "instruction", "noise_seed", "prev_chunk",
                "delay_steps", "timeout_ms"}


def hello_request(request_id: int, client: str = "") -> dict:
    return {"kind": "hello", "request_id": request_id, "protocol": PROTOCOL_VERSION, "client": client}


def ping_request(request_id: int) -> dict:
    return {"kind": "ping", "request_id": request_id}


def infer_request(request_id: int, images: dict[str, np.ndarray], state: np.ndarray, t_capture: float,
                  instruction: str | None = None, noise_seed: int | None = None, prev_chunk: np.ndarray | None = None,
                  delay_steps: int | None = None, timeout_ms: float | None = None) -> dict:
    msg: dict[str, Any] = {"kind": "infer", "request_id": request_id, "t_capture": float(t_capture),
                           "images": dict(images), "state": state}
    optional = {"instruction": instruction, "noise_seed": noise_seed, "prev_chunk": prev_chunk,
                "delay_steps": delay_steps, "timeout_ms": timeout_ms}
    msg.update({k: v for k, v in optional.items() if v is not None})
    return msg


Request = HelloRequest | PingRequest | InferRequest


def parse_request(data: bytes | memoryview, contract: Contract, limits: Limits = Limits(),
                  attached: Sequence[Any] = ()) -> Request:
    """Decode and validate one client message (header and attached frames) against the contract."""
    msg = decode(data, limits, attached)
    if not isinstance(msg, dict):
        raise ProtocolError(BAD_MESSAGE, f"message must be a map, got {type(msg).__name__}")
    rid_hint = _request_id_hint(msg)
    kind = msg.get("kind")
    if not isinstance(kind, str):
        raise ProtocolError(BAD_MESSAGE, "message needs a string field 'kind'", rid_hint)
    if kind == "hello":
        rid = _request_id(msg)
        _check_fields(msg, {"kind", "request_id", "protocol", "client"}, rid)
        version = _require(msg, "protocol", rid)
        if not _is_int(version):
            raise ProtocolError(BAD_TYPE, "protocol must be an integer", rid)
        if version not in SUPPORTED_VERSIONS:
            raise ProtocolError(UNSUPPORTED_VERSION, f"client speaks protocol {version}, server "
                                f"{' or '.join(map(str, SUPPORTED_VERSIONS))}", rid)
        client = msg.get("client", "")
        if not isinstance(client, str):
            raise ProtocolError(BAD_TYPE, "client must be a string", rid)
        return HelloRequest(rid, version, client)
    if kind == "ping":
        rid = _request_id(msg)
        _check_fields(msg, {"kind", "request_id"}, rid)
        return PingRequest(rid)
    if kind == "infer":
        return _validate_infer(msg, contract)
    raise ProtocolError(UNKNOWN_KIND, f"unknown kind {kind[:40]!r}; expected hello, infer or ping", rid_hint)


def _validate_infer(msg: dict, c: Contract) -> InferRequest:
    rid = _request_id(msg)
    _check_fields(msg, INFER_FIELDS, rid)
    t_capture = _require(msg, "t_capture", rid)
    if not _is_number(t_capture) or not math.isfinite(t_capture):
        raise ProtocolError(BAD_TYPE, "t_capture must be a finite number (seconds)", rid)
    images = _require(msg, "images", rid)
    if not isinstance(images, dict):
        raise ProtocolError(BAD_TYPE, "images must be a map camera name -> ndarray", rid)
    if images.keys() != c.camera_names:
        names = [cam.name for cam in c.cameras]
        missing = [n for n in names if n not in images]
        if missing:
            raise ProtocolError(MISSING_CAMERA, f"missing camera(s) {missing}; the model needs {names}", rid)
        unknown = sorted(str(k) for k in images if k not in names)
        raise ProtocolError(UNKNOWN_CAMERA, f"unknown camera(s) {unknown}; the model needs {names}", rid)
    checked = {cam.name: _array(images[cam.name], f"images[{cam.name!r}]", UINT8, (cam.height, cam.width, 3), rid,
                                finite=False) for cam in c.cameras}
    state = _array(_require(msg, "state", rid), "state", FLOAT32, (c.state_dim,), rid, finite=True)

    instruction = msg.get("instruction")
    if instruction is not None:
        if not isinstance(instruction, str):
            raise ProtocolError(BAD_TYPE, "instruction must be a string", rid)
        n = len(instruction.encode("utf-8", "surrogatepass"))
        if n > c.instruction_max_bytes:
            raise ProtocolError(INSTRUCTION_TOO_LONG, f"instruction is {n} UTF-8 bytes; at most "
                                f"{c.instruction_max_bytes}", rid)
    seed = msg.get("noise_seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed <= SEED_MAX):
        raise ProtocolError(BAD_TYPE, f"noise_seed must be an integer in [0, {SEED_MAX}]", rid)
    delay = msg.get("delay_steps")
    if delay is not None and (not _is_int(delay) or not 0 <= delay <= c.horizon):
        raise ProtocolError(BAD_TYPE, f"delay_steps must be an integer in [0, {c.horizon}]", rid)
    prev = msg.get("prev_chunk")
    if prev is not None:
        if not isinstance(prev, np.ndarray) or prev.ndim != 2 or not 0 < prev.shape[0] <= c.horizon:
            raise ProtocolError(BAD_SHAPE, f"prev_chunk must be an ndarray [n, {c.action_dim}] with "
                                f"1 <= n <= {c.horizon}", rid)
        prev = _array(prev, "prev_chunk", FLOAT32, (prev.shape[0], c.action_dim), rid, finite=True)
    timeout = msg.get("timeout_ms")
    if timeout is not None and (not _is_number(timeout) or not 0 < timeout < math.inf):
        raise ProtocolError(BAD_TYPE, "timeout_ms must be a positive number", rid)
    return InferRequest(rid, float(t_capture), checked, state, instruction, seed, prev, delay,
                        None if timeout is None else float(timeout))


# ----- replies --------------------------------------------------------------------------------------------------------
def hello_reply(request_id: int, contract: Contract) -> dict:
    return {"kind": "hello", "request_id": request_id, "contract": contract.to_wire()}


def error_reply(code: str, message: str, request_id: int | None = None) -> dict:
    return {"kind": "error", "request_id": request_id, "code": code, "message": message[:500]}


def pong_reply(request_id: int, instance: str, health: dict) -> dict:
    return {"kind": "pong", "request_id": request_id, "instance": instance, "health": health}


@dataclass
class Timing:
    """Per-stage server timings of one reply, in milliseconds, plus server wall-clock stamps (seconds)."""

    queue_ms: float = 0.0
    decode_ms: float = 0.0
    infer_ms: float = 0.0
    encode_ms: float = 0.0
    t_recv: float = 0.0
    t_send: float = 0.0
    batch_size: int = 1

    def to_wire(self) -> dict:
        return {"queue_ms": self.queue_ms, "decode_ms": self.decode_ms, "infer_ms": self.infer_ms,
                "encode_ms": self.encode_ms, "t_recv": self.t_recv, "t_send": self.t_send,
                "batch_size": self.batch_size}


@dataclass
class ActionsReply:
    request_id: int
    actions: np.ndarray
    instance: str
    t_capture: float
    clipped: bool
    clipped_values: int
    timing: Timing = field(default_factory=Timing)
    delay_steps: int | None = None
    rtc_applied: bool = False


def actions_reply(r: ActionsReply, packed_actions: msgpack.ExtType | np.ndarray) -> dict:
    return {"kind": "actions", "request_id": r.request_id, "instance": r.instance, "actions": packed_actions,
            "t_capture": r.t_capture, "clipped": r.clipped, "clipped_values": r.clipped_values,
            "delay_steps": r.delay_steps, "rtc_applied": r.rtc_applied, "timing": r.timing.to_wire()}


@dataclass
class ErrorReply:
    code: str
    message: str
    request_id: int | None


@dataclass
class HelloReply:
    request_id: int
    contract: Contract


@dataclass
class PongReply:
    request_id: int
    instance: str
    health: dict


def parse_reply(data: bytes | memoryview, limits: Limits = Limits(),
                attached: Sequence[Any] = ()) -> HelloReply | ActionsReply | PongReply | ErrorReply:
    """Client side: decode one server reply (raises ProtocolError when the server breaks the format)."""
    msg = decode(data, limits, attached)
    if not isinstance(msg, dict) or not isinstance(msg.get("kind"), str):
        raise ProtocolError(BAD_MESSAGE, "reply is not a map with a string 'kind'")
    kind = msg["kind"]
    try:
        if kind == "error":
            rid = msg.get("request_id")
            return ErrorReply(str(msg["code"]), str(msg["message"]), rid if _is_int(rid) else None)
        if kind == "hello":
            return HelloReply(int(msg["request_id"]), Contract.from_wire(msg["contract"]))
        if kind == "pong":
            return PongReply(int(msg["request_id"]), str(msg["instance"]), dict(msg["health"]))
        if kind == "actions":
            t = msg["timing"]
            actions = msg["actions"]
            if not isinstance(actions, np.ndarray) or actions.dtype != np.float32 or actions.ndim != 2:
                raise ProtocolError(BAD_ARRAY, "actions must be a float32 ndarray [H, A]")
            timing = Timing(float(t["queue_ms"]), float(t["decode_ms"]), float(t["infer_ms"]), float(t["encode_ms"]),
                            float(t["t_recv"]), float(t["t_send"]), int(t["batch_size"]))
            delay = msg.get("delay_steps")
            return ActionsReply(int(msg["request_id"]), actions, str(msg["instance"]), float(msg["t_capture"]),
                                bool(msg["clipped"]), int(msg["clipped_values"]), timing,
                                delay if _is_int(delay) else None, bool(msg.get("rtc_applied", False)))
    except (KeyError, TypeError, ValueError) as e:
        raise ProtocolError(BAD_MESSAGE, f"malformed {kind} reply ({e!r})") from None
    raise ProtocolError(UNKNOWN_KIND, f"unknown reply kind {kind[:40]!r}")
