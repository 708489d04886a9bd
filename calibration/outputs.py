"""The files a `calibrate` command writes: checked before the work, written whole, never replaced unasked.

Every output path is checked before any image is read (a directory where a file should be, an unwritable or
missing-and-uncreatable folder, a name too long for the file system, a path that is also an input, an
existing file without --force). The files are then written only once the result has passed every gate,
each one atomically (temp file + rename), so a refused or interrupted run leaves what was there untouched.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import cv2
import numpy as np

from policy_runtime.artifacts import atomic_write_bytes, probe_writable
from policy_runtime.errors import UserError
from policy_runtime.yaml_io import dump_yaml

IMAGE_OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
TEMP_NAME_EXTRA = 32  # bytes the temp files' names add to an output's name (".NAME.PID.new" and mkstemp's own)


def check_outputs(outputs: list[Path], *, force: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse, before any work, every output this run could not write or must not replace."""
    resolved_inputs = {Path(p).resolve() for p in inputs}
    for out in outputs:
        out = Path(out)
        _check_name_length(out, _check_folder(out.parent))
        if out.resolve() in resolved_inputs:
            raise UserError(f"output {out} is also an input of this run; choose another path")
        if out.is_dir():
            raise UserError(f"output {out} is a directory, not a file")
        if out.exists() and not force:
            raise UserError(f"output {out} exists; pass --force to replace it or choose another path")
    if len({Path(p).resolve() for p in outputs}) != len(outputs):
        raise UserError("two outputs of this run have the same path: " + ", ".join(map(str, outputs)))


def _check_folder(folder: Path) -> Path:
    """The output's folder exists as a writable directory or can be created (nothing is created here).

    Returns the folder, or its nearest existing ancestor when it is still to be created.
    """
    missing, existing = [], folder
    try:
        while not existing.exists():
            missing.append(existing.name)
            existing = existing.parent
    except OSError as e:
        raise UserError(f"cannot use output folder {folder}: {_reason(e)}") from None
    if not existing.is_dir():
        raise UserError(f"{existing} is a file, not a directory (in output folder {folder})")
    probe_writable(existing, "output folder")
    limit = os.pathconf(existing, "PC_NAME_MAX")
    if any(len(name.encode()) > limit for name in missing):
        raise UserError(f"cannot create output folder {folder}: name too long")
    return existing


def _check_name_length(path: Path, folder: Path) -> None:
    """A file name longer than the file system allows would only fail at the final write, after all the work."""
    limit = os.pathconf(folder, "PC_NAME_MAX") - TEMP_NAME_EXTRA
    if len(path.name.encode()) > limit:
        raise UserError(f"output file name {path.name[:40]}... is too long ({len(path.name.encode())} bytes; "
                        f"at most {limit} here, with room for the temp file written first)")


def _reason(e: OSError) -> str:
    return "name too long" if e.errno == errno.ENAMETOOLONG else (e.strerror or str(e))


def check_image_suffix(path: Path) -> None:
    if Path(path).suffix.lower() not in IMAGE_OUTPUT_SUFFIXES:
        raise UserError(f"image output {path} must end in one of {', '.join(IMAGE_OUTPUT_SUFFIXES)}")


def write_new(path: Path, data: bytes, *, force: bool) -> Path:
    """Atomic write; without `force` it never replaces a file, even one that appeared while this run worked."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if force:
            return atomic_write_bytes(path, data)
        tmp = atomic_write_bytes(path.with_name(f".{path.name}.{os.getpid()}.new"), data)
        try:
            _link_no_replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as e:
        raise UserError(f"cannot write {path}: {_reason(e)}") from None
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
    return dump_yaml(data).encode()


def image_bytes(path: Path, image: np.ndarray) -> bytes:
    """The image encoded in the format its path names (checked up front by check_image_suffix)."""
    ok, buf = cv2.imencode(Path(path).suffix.lower(), image)
    if not ok:
        raise UserError(f"cannot encode {path} as {Path(path).suffix}")
    return buf.tobytes()
