"""Writing what users keep (checkpoints, exports, reports, calibration files) without ever losing it.

Three rules, shared by every command that writes an output:
- a file appears whole or not at all (`atomic_write_*`: temp file in the same directory, fsync, rename);
- a command never replaces an artifact it did not create in this run unless the user says so
  (`claim_output_dir`: a non-empty output directory is refused without --force / --resume);
- two runs never write one output at once (`OutputLock`: an exclusive advisory lock held for the run).

Torch-free on purpose: the runtime, calibration and the trainers all use it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from policy_runtime.errors import UserError

T = TypeVar("T")
LOCK_NAME = ".lock"
PROBE_PREFIX = ".write-probe-"  # a short-lived file that proves a directory writable


def is_bookkeeping(name: str) -> bool:
    """Files the output rules themselves create (the lock, a write probe): never a user's artifact.

    Another process checking the same output at the same moment (the other ranks of a torchrun job) must not
    take them for contents.
    """
    return name == LOCK_NAME or name.startswith(PROBE_PREFIX)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` so that a reader (or a crash) sees the old file or the new one, never half."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, _file_mode(path))  # the mode a plain write would give: the replaced file's, or the umask's
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _file_mode(path: Path) -> int:
    """The replaced file's mode, or for a new file the one open() would give (0666 less the umask)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def check_writable_dir(path: str | Path, what: str = "output directory") -> Path:
    """Fail before any work if `path` cannot become a writable directory (a file, a read-only parent, too long)."""
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise UserError(f"{what} {path} is a file, not a directory")
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        reason = "name too long" if e.errno == errno.ENAMETOOLONG else (e.strerror or str(e))
        raise UserError(f"cannot create {what} {path}: {reason}") from None
    probe_writable(path, what)
    return path


def probe_writable(directory: Path, what: str = "output directory") -> None:
    """Create and remove a file: permission bits do not tell (root, read-only mounts, /proc)."""
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=PROBE_PREFIX):
            pass
    except OSError as e:
        raise UserError(f"{what} {directory} is not writable ({e.strerror})") from None


def claim_output_dir(path: str | Path, *, force: bool = False, resume: bool = False,
                     inputs: tuple[str | Path, ...] = (), what: str = "output directory") -> Path:
    """Make `path` this run's output, refusing to replace what is already there.

    A directory that exists and holds anything (other than a stale lock file) is refused unless `force`
    (replace) or `resume` (continue a run, checked by the caller) is given. An output that is one of the
    run's own inputs is refused even with --force: the run would destroy what it reads.
    """
    path = Path(path)
    for src in inputs:
        if src and Path(src).resolve() == path.resolve():
            raise UserError(f"{what} {path} is also this run's input; choose another --out")
    path = check_writable_dir(path, what)
    if not (force or resume) and any(not is_bookkeeping(p.name) for p in path.iterdir()):
        raise UserError(f"{what} {path} is not empty; pass --force to replace its contents or choose a new --out")
    return path


class OutputLock:
    """An exclusive lock on an output directory for the length of a run (released by the OS if the run dies)."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot lock {self.path.parent}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"{self.path.parent} is being written by another run (pid {holder}); "
                            "wait for it or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the lock goes with the descriptor; the file stays (harmless, ignored above)
            self._fd = None


def remove_if_empty(out: Path) -> None:
    """A run that created `out` and failed leaves no empty directory behind (its lock file aside, it is empty)."""
    (out / LOCK_NAME).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        out.rmdir()


def build_and_publish(out: Path, created: bool, tag: str, build: Callable[[Path], T],
                      publish: Callable[[Path, Path], None]) -> T:
    """Under out's lock, `build` into a fresh directory on out's file system, then `publish(staging, out)`.

    A failure anywhere (an exception, a refused check, Ctrl-C) leaves `out` as it was: the staging directory
    always goes, and a run that created `out` removes it again. Returns what `build` returned.
    """
    try:
        with OutputLock(out):
            staging = _staging_dir(out, tag)
            try:
                result = build(staging)
                publish(staging, out)
                return result
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        if created:
            remove_if_empty(out)
        raise


def _staging_dir(out: Path, tag: str) -> Path:
    """A fresh directory on out's file system, so that publishing is a rename: beside `out`, or inside it when
    its parent is not writable or is another file system (`out` a mount point)."""
    parent = out.resolve().parent
    where = parent if os.access(parent, os.W_OK) and os.stat(parent).st_dev == os.stat(out).st_dev else out
    try:
        return Path(tempfile.mkdtemp(prefix=f".{out.resolve().name}.{tag}-", dir=where))
    except OSError as e:
        raise UserError(f"cannot create a build directory in {where}: {e.strerror}") from None
