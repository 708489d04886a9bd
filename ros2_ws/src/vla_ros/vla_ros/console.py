"""Single-key terminal input for the operator (no Enter needed), used by the eval manager, teleop and capture.

Only active when stdin is a terminal; the terminal mode is restored on close. Several nodes in one process
share one reader: each registers the keys it handles.
"""

from __future__ import annotations

import os
import select
import sys
import threading
from collections.abc import Callable

_handlers: dict[str, Callable[[str], None]] = {}
_lock = threading.Lock()
_thread: threading.Thread | None = None
_stop = threading.Event()
_saved = None


def available() -> bool:
    return sys.stdin is not None and sys.stdin.isatty() and os.name == "posix"


def register(keys: str, handler: Callable[[str], None]) -> bool:
    """Route `keys` to `handler`; starts the reader on first use. False when stdin is not a terminal."""
    global _thread, _saved
    if not available():
        return False
    with _lock:
        for k in keys:
            _handlers[k] = handler
        if _thread is None:
            import termios
            import tty

            fd = sys.stdin.fileno()
            _saved = termios.tcgetattr(fd)
            tty.setcbreak(fd)
            _thread = threading.Thread(target=_read, name="operator_console", daemon=True)
            _thread.start()
    return True


def _read() -> None:
    fd = sys.stdin.fileno()
    while not _stop.is_set():
        ready, _, _ = select.select([fd], [], [], 0.2)
        if not ready:
            continue
        ch = os.read(fd, 1).decode(errors="ignore")
        with _lock:
            handler = _handlers.get(ch)
        if handler is not None:
            handler(ch)


def close() -> None:
    global _thread
    _stop.set()
    if _thread is not None:
        import termios

        _thread.join(timeout=1.0)
        termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, _saved)
        _thread = None
