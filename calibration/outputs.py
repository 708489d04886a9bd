"""The files a `calibrate` command writes: checked before the work, written whole, never replaced unasked.

Every output path is checked before any image is read (a directory where a file should be, an unwritable or
missing-and-uncreatable folder, a name too long for the file system, a path that is also an input, an
existing file without --force). The files are then written only once the result has passed every gate,
each one atomically (temp file + rename), so a refused or interrupted run leaves what was there untouched.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import cv2
import numpy as np
import yaml

from policy_runtime.artifacts import atomic_write_bytes, check_writable_dir
from policy_runtime.errors import UserError

IMAGE_OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def check_outputs(outputs: list[Path], *, force: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse, before any work, every output this run could not write or must not replace."""
    resolved_inputs = {Path(p).resolve() for p in inputs}
    for out in outputs:
        out = Path(out)
        check_writable_dir(out.parent, "output directory")
        _check_name_length(out)
        if out.resolve() in resolved_inputs:
            raise UserError(f"output {out} is also an input of this run; choose another path")
        if out.is_dir():
            raise UserError(f"output {out} is a directory, not a file")
        if out.exists() and not force:
            raise UserError(f"output {out} exists; pass --force to replace it or choose another path")
        _probe_write(out.parent)
    if len({Path(p).resolve() for p in outputs}) != len(outputs):
        raise UserError("two outputs of this run have the same path: " + ", ".join(map(str, outputs)))


def _probe_write(directory: Path) -> None:
    """Create and remove a file: permission bits do not tell (root, read-only mounts, /sys, /proc)."""
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".calibrate-probe-"):
            pass
    except OSError as e:
        raise UserError(f"output directory {directory} is not writable ({e.strerror})") from None


def _check_name_length(path: Path) -> None:
    """A file name longer than the file system allows would only fail at the final write, after all the work."""
    limit = os.pathconf(path.parent, "PC_NAME_MAX")
    if len(path.name.encode()) + 16 > limit:  # + room for the temp file's prefix and suffix
        raise UserError(f"output file name {path.name[:40]}... is too long ({len(path.name.encode())} bytes; "
                        f"this file system allows {limit - 16} here)")


def check_image_suffix(path: Path) -> None:
    if Path(path).suffix.lower() not in IMAGE_OUTPUT_SUFFIXES:
        raise UserError(f"image output {path} must end in one of {', '.join(IMAGE_OUTPUT_SUFFIXES)}")


def write_new(path: Path, data: bytes, *, force: bool) -> Path:
    """Atomic write; without `force` it never replaces a file, even one that appeared while this run worked."""
    path = Path(path)
    try:
        if force:
            return atomic_write_bytes(path, data)
        tmp = atomic_write_bytes(path.with_name(f".{path.name}.{os.getpid()}.new"), data)
        try:
            _link_no_replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as e:
        reason = "name too long" if e.errno == errno.ENAMETOOLONG else (e.strerror or str(e))
        raise UserError(f"cannot write {path}: {reason}") from None
    return path


def _link_no_replace(tmp: Path, path: Path) -> None:
    """Give the complete temp file its final name unless that name is taken (a hard link never replaces)."""
    try:
        os.link(tmp, path)
        return
    except FileExistsError:
        raise UserError(f"output {path} was created by another process while this run worked; not replaced "
                        "(pass --force to replace it)") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
            raise
    if path.exists():  # a file system without hard links: check, then rename
        raise UserError(f"output {path} was created by another process while this run worked; not replaced "
                        "(pass --force to replace it)")
    os.replace(tmp, path)


def yaml_bytes(data: dict) -> bytes:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=160).encode()


def image_bytes(path: Path, image: np.ndarray) -> bytes:
    """The image encoded in the format its path names (checked up front by check_image_suffix)."""
    ok, buf = cv2.imencode(Path(path).suffix.lower(), image)
    if not ok:
        raise UserError(f"cannot encode {path} as {Path(path).suffix}")
    return buf.tobytes()
