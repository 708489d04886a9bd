"""The output directory of a `demos`, `sft` or `rl` run: claimed before any work, locked for the run.

A run never replaces what it did not create: a non-empty --out is refused unless --resume continues the
run in it (checked against its saved state by the trainer) or --force replaces it. --force only ever
deletes what these commands write (a checkpoint, trainer state, metrics, TensorBoard logs, an export, an
episode dataset), so a mistyped `--out ~ --force` is refused rather than emptying a home directory.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from policy_runtime.artifacts import OutputLock, claim_output_dir, is_bookkeeping
from sim_trainer.errors import UserError

# What `sft`/`rl --force` may replace: a checkpoint with its trainer state, metrics and logs, or an export.
CHECKPOINT_ENTRIES = frozenset({
    "config.json", "model.safetensors", "norm_stats.json", "trainer_state.json", "trainer_state.safetensors",
    "rl_state.json", "rl_state.safetensors", "metrics.jsonl", "tb", "policy.onnx", "manifest.json"})
# What `demos --force` may replace: an episode dataset.
DATASET_ENTRIES = frozenset({"dataset.json", "episodes"})


class RunDir:
    """Construct before any work (the checks), enter for the run (lock; with --force, clear the old contents)."""

    def __init__(self, out: str | Path, *, what: str, force: bool = False, resume: bool = False,
                 inputs: tuple[str | Path | None, ...] = (), state_file: str | None = None,
                 replaceable: frozenset[str] = CHECKPOINT_ENTRIES):
        if force and resume:
            raise UserError("give --force (replace the run in --out) or --resume (continue it), not both")
        self.path, self.what, self.force, self.resume = Path(out), what, force, resume
        self.inputs = tuple(str(p) for p in inputs if p)
        self.state_file, self.replaceable = state_file, replaceable
        self._lock: OutputLock | None = None
        self._check()

    def _check(self) -> None:
        path, state = self.path, self.state_file
        claim_output_dir(path, force=True, inputs=self.inputs)  # the path itself: an input, a file, unwritable
        if state and (path / state).is_file() and not (self.force or self.resume):
            raise UserError(f"{path} holds {self.what} already; pass --resume to continue it, --force to "
                            "replace it, or choose a new --out")
        claim_output_dir(path, force=self.force, resume=self.resume, inputs=self.inputs)
        existing = [p.name for p in path.iterdir() if not is_bookkeeping(p.name)]
        if self.resume and state and existing and not (path / state).is_file():
            raise UserError(f"cannot --resume in {path}: it holds no {state}, so it is not {self.what}; "
                            "choose a new --out")
        foreign = sorted(n for n in existing if n not in self.replaceable and not n.endswith(".tmp"))
        if self.force and foreign:
            raise UserError(f"--force only replaces what sim-trainer writes, but {path} also holds "
                            f"{', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}; remove those or "
                            "choose another --out")

    def __enter__(self) -> Path:
        self._lock = OutputLock(self.path).__enter__()
        try:
            self._check()  # again under the lock: another run may have written here since
            if self.force:
                self._clear()
        except BaseException:
            self.__exit__()
            raise
        return self.path

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.__exit__()
            self._lock = None

    def _clear(self) -> None:
        for p in self.path.iterdir():
            if p.name in self.replaceable or p.name.endswith(".tmp"):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
