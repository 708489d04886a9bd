"""The bad-input contract of every command-line tool, as one helper the bad-input tables share.

A user mistake must end in exit code 2, exactly one line on stderr, no traceback, and no pre-existing file
changed (checked by content hash over the directories the case touches).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY = {"sim-trainer": "sim_trainer.cli", "policy-runtime": "policy_runtime.cli", "calibrate": "calibration.cli"}


def tree_hashes(*roots: Path) -> dict[str, str]:
    """Content hash of every file under the roots (the lock file a refused run may leave is not content)."""
    out = {}
    for root in roots:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            if p.name != ".lock":
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_cli(tool: str, args: list[str], cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-m", ENTRY[tool], *map(str, args)], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def assert_user_error(result: subprocess.CompletedProcess, contains: str | None = None) -> str:
    """Exit 2, one line on stderr (no traceback), optionally containing `contains`; returns that line."""
    err = result.stderr.strip()
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    if contains is not None:
        assert contains.lower() in lines[0].lower(), f"{contains!r} not in {lines[0]!r}"
    return lines[0]


def assert_refused_unchanged(tool: str, args: list[str], watched: list[Path], contains: str | None = None,
                             cwd: Path | None = None) -> str:
    """Run a bad-input case: a one-line refusal with exit 2, and every watched file byte-for-byte unchanged."""
    before = tree_hashes(*watched)
    line = assert_user_error(run_cli(tool, args, cwd=cwd), contains)
    after = tree_hashes(*watched)
    assert after == before, f"files changed by a refused run: {sorted(set(after.items()) ^ set(before.items()))}"
    return line
