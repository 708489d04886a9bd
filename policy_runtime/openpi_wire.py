"""openpi's message encoding: msgpack in which numpy values are maps with bytes keys.

An array is `{b"__ndarray__": True, b"data": raw C-order bytes, b"dtype": dtype.str, b"shape": [dims]}` and a
numpy scalar `{b"__npgeneric__": True, b"data": value, b"dtype": dtype.str}`, in that key order; text keys
would not be recognised by `openpi-client`. `packb` produces the same bytes as the client's packer for the same
value. `unpackb` decodes untrusted bytes under the server's Limits and the same array rules as our own protocol,
so anything malformed is a ProtocolError and never another exception.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

from policy_runtime.protocol import ALLOWED_DTYPES, BAD_ARRAY, BAD_MSGPACK, Limits, ProtocolError, checked_array

NDARRAY_KEY, NPGENERIC_KEY = b"__ndarray__", b"__npgeneric__"
_REFUSED_KINDS = "VOc"  # void, object and complex values are never sent
DEFAULT_LIMITS = Limits()


def _default(obj: Any) -> Any:
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in _REFUSED_KINDS:
        raise TypeError(f"dtype {obj.dtype} cannot be sent")
    if isinstance(obj, np.ndarray):
        return {NDARRAY_KEY: True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {NPGENERIC_KEY: True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot encode {type(obj).__name__}")


def packb(obj: Any) -> bytes:
    """openpi wire bytes of `obj` (maps, lists, text, numbers, numpy arrays and scalars)."""
    return msgpack.packb(obj, default=_default, use_bin_type=True)


def _scalar(obj: dict) -> np.generic:
    dt, value = obj.get(b"dtype"), obj.get(b"data")
    if not isinstance(dt, str) or dt not in ALLOWED_DTYPES or not isinstance(value, (bool, int, float)):
        raise ProtocolError(BAD_ARRAY, "numpy scalar needs an allowed dtype string and a number")
    try:
        return np.dtype(dt).type(value)
    except (OverflowError, ValueError) as e:
        raise ProtocolError(BAD_ARRAY, f"numpy scalar {value!r} does not fit {dt}: {e}") from None


def unpackb(data: bytes | memoryview, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Decode one openpi message; arrays come back as read-only views of `data` (no copy)."""

    def object_hook(obj: dict) -> Any:
        if NDARRAY_KEY in obj:
            return checked_array(obj.get(b"dtype"), obj.get(b"shape"), obj.get(b"data"), limits.max_array_bytes)
        if NPGENERIC_KEY in obj:
            return _scalar(obj)
        return obj

    try:
        return msgpack.unpackb(data, object_hook=object_hook, raw=False, strict_map_key=True, timestamp=0,
                               max_str_len=limits.max_message_bytes, max_bin_len=limits.max_message_bytes,
                               max_array_len=limits.max_items, max_map_len=limits.max_items, max_ext_len=0)
    except ProtocolError:
        raise
    except Exception as e:  # ExtraData, FormatError, StackError, ValueError, TypeError, ...
        raise ProtocolError(BAD_MSGPACK, f"not a valid msgpack message ({type(e).__name__}: {str(e)[:120]})") from None
