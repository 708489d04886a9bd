"""The project's episode format: one directory per dataset, one HDF5 file per episode.

Spec in docs/datasets.md; the names and version are the contract's (policy_runtime.contract). Torch-free, so
the robot's recorder writes the same files the trainer reads. Each episode is written to a temporary file and
renamed into place, so a crash never leaves a half-written episode that looks complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from policy_runtime.artifacts import atomic_write_text
from policy_runtime.contract import (
    DATASET_META_FILE,
    EPISODE_ATTRS,
    EPISODE_FORMAT,
    EPISODE_SOURCES,
    EPISODE_VERSION,
    PolicySpec,
)
from policy_runtime.errors import UserError


@dataclass
class Episode:
    """One trajectory: obs[t] is what the policy saw before it took actions[t]."""

    state: np.ndarray  # [T, S] float32
    actions: np.ndarray  # [T, A] float32
    images: dict[str, np.ndarray]  # camera -> [T, H, W, 3] uint8
    instruction: str
    success: bool
    control_hz: float
    source: str  # "sim" | "real-proxy" | "real"
    task: str
    control_mode: str
    state_layout: tuple[tuple[str, int], ...]
    provenance: dict = field(default_factory=dict)
    reward: np.ndarray | None = None  # [T] float32
    timestamps: np.ndarray | None = None  # [T] float64, seconds since episode start

    def __len__(self) -> int:
        return int(self.actions.shape[0])

    def validate(self) -> Episode:
        t = len(self)
        if self.actions.ndim != 2 or self.state.ndim != 2 or self.state.shape[0] != t:
            raise UserError(f"episode arrays disagree: actions {self.actions.shape}, state {self.state.shape}")
        for cam, frames in self.images.items():
            if frames.shape[0] != t or frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
                raise UserError(f"camera {cam!r}: frames must be uint8 [T={t}, H, W, 3], got {frames.shape}")
        if self.source not in EPISODE_SOURCES:
            raise UserError(f"episode source must be one of {EPISODE_SOURCES}, got {self.source!r}")
        if sum(n for _, n in self.state_layout) != self.state.shape[1]:
            raise UserError("state layout does not add up to the state dimension")
        return self


class EpisodeWriter:
    """Appends episodes to a dataset directory (creating it); never overwrites an existing episode."""

    def __init__(self, root: str | Path, spec: PolicySpec | None = None, meta: dict | None = None):
        self.root = Path(root)
        (self.root / "episodes").mkdir(parents=True, exist_ok=True)
        meta_path = self.root / DATASET_META_FILE
        if not meta_path.exists():
            info = {**(meta or {}), "format": EPISODE_FORMAT, "version": EPISODE_VERSION}
            if spec is not None:
                info["spec"] = spec.to_dict()
            atomic_write_text(meta_path, json.dumps(info, indent=2))
        elif spec is not None:
            # Appending to an existing dataset (e.g. a new session of real trials): same contract only.
            diffs = dataset_spec(self.root, require_episodes=False).differences(spec, ignore=("instruction",))
            if diffs:
                raise UserError(f"dataset {self.root} was recorded with another spec: " + "; ".join(diffs))

    def next_index(self) -> int:
        existing = sorted((self.root / "episodes").glob("episode_*.h5"))
        return int(existing[-1].stem.split("_")[1]) + 1 if existing else 0

    def write(self, ep: Episode, index: int | None = None) -> Path:
        ep.validate()
        index = self.next_index() if index is None else index
        path = self.root / "episodes" / f"episode_{index:06d}.h5"
        if path.exists():
            raise UserError(f"{path} exists already; episodes are never overwritten")
        tmp = path.with_suffix(f".h5.{os.getpid()}.tmp")
        try:
            self._write_file(tmp, ep)
            os.link(tmp, path)  # atomic and never clobbers: a concurrent writer of the same index fails here
        except FileExistsError:
            raise UserError(f"{path} exists already; episodes are never overwritten") from None
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @staticmethod
    def _write_file(tmp: Path, ep: Episode) -> None:
        with h5py.File(tmp, "w") as f:
            f.attrs.update(_attrs(ep))
            f.create_dataset("actions", data=ep.actions.astype(np.float32))
            f.create_dataset("state", data=ep.state.astype(np.float32))
            if ep.reward is not None:
                f.create_dataset("reward", data=np.asarray(ep.reward, np.float32))
            if ep.timestamps is not None:
                f.create_dataset("timestamps", data=np.asarray(ep.timestamps, np.float64))
            g = f.create_group("images")
            for cam, frames in ep.images.items():
                h, w = frames.shape[1:3]
                # One frame per chunk; the unlimited first axis lets a trial that never acted (0 frames) keep
                # its record too (a chunk may not exceed a fixed-size dataset).
                g.create_dataset(cam, data=frames, chunks=(1, h, w, 3), maxshape=(None, h, w, 3),
                                 compression="gzip", compression_opts=4)
            f.flush()
            os.fsync(f.id.get_vfd_handle())


def _attrs(ep: Episode) -> dict:
    """The episode file's attributes: exactly the contract's EPISODE_ATTRS."""
    attrs = {"format": EPISODE_FORMAT, "version": EPISODE_VERSION, "instruction": ep.instruction,
             "success": bool(ep.success), "control_hz": float(ep.control_hz), "source": ep.source, "task": ep.task,
             "control_mode": ep.control_mode, "state_layout": json.dumps([list(x) for x in ep.state_layout]),
             "provenance": json.dumps(ep.provenance)}
    assert tuple(attrs) == EPISODE_ATTRS
    return attrs


def read_episode(path: str | Path, with_images: bool = True) -> Episode:
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != EPISODE_FORMAT:
                raise UserError(f"{path} is not a {EPISODE_FORMAT} episode file")
            version = int(f.attrs["version"])
            if version > EPISODE_VERSION:
                raise UserError(f"{path} has format version {version}; this software reads up to {EPISODE_VERSION}")
            missing = [k for k in EPISODE_ATTRS if k not in f.attrs]
            if missing:
                raise UserError(f"corrupt episode file {path}: no attribute(s) {', '.join(missing)}")
            images = {k: f["images"][k][()] for k in f["images"]} if with_images else {}
            ep = Episode(
                state=f["state"][()],
                actions=f["actions"][()],
                images=images,
                instruction=str(f.attrs["instruction"]),
                success=bool(f.attrs["success"]),
                control_hz=float(f.attrs["control_hz"]),
                source=str(f.attrs["source"]),
                task=str(f.attrs["task"]),
                control_mode=str(f.attrs["control_mode"]),
                state_layout=tuple((n, int(k)) for n, k in json.loads(f.attrs["state_layout"])),
                provenance=json.loads(f.attrs["provenance"]),
                reward=f["reward"][()] if "reward" in f else None,
                timestamps=f["timestamps"][()] if "timestamps" in f else None,
            )
    except UserError:
        raise
    except (OSError, KeyError, TypeError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"corrupt episode file {path}: {reason}") from None
    return ep.validate()


def _dataset_info(root: Path) -> dict:
    """dataset.json of an episode dataset, checked: a wrong path or a foreign file is one clear line."""
    if not root.exists():
        raise UserError(f"dataset {root} does not exist")
    if not root.is_dir():
        raise UserError(f"dataset {root} is a file, not an episode dataset directory")
    meta = root / DATASET_META_FILE
    if not meta.is_file():
        raise UserError(f"{root} is not an episode dataset (no dataset.json)")
    try:
        info = json.loads(meta.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"corrupt {meta}: {e}") from None
    if not isinstance(info, dict) or info.get("format") != EPISODE_FORMAT:
        raise UserError(f"{meta} does not describe a {EPISODE_FORMAT} dataset")
    version = info.get("version", 0)
    if not isinstance(version, int):
        raise UserError(f"{meta}: version must be an integer, got {version!r}")
    if version > EPISODE_VERSION:
        raise UserError(f"dataset {root} has format version {version}; this software reads up to {EPISODE_VERSION}")
    return info


def list_episodes(root: str | Path, require_episodes: bool = True) -> list[Path]:
    root = Path(root)
    _dataset_info(root)
    paths = sorted((root / "episodes").glob("episode_*.h5"))
    if not paths and require_episodes:
        raise UserError(f"dataset {root} has no episodes")
    return paths


def load_dataset(root: str | Path, successful_only: bool = True) -> list[Episode]:
    """The dataset's episodes; one recorded with another task, control mode, state or cameras is refused."""
    spec = dataset_spec(root) if "spec" in _dataset_info(Path(root)) else None
    eps = []
    for path in list_episodes(root):
        ep = read_episode(path)
        _check_belongs(ep, path, spec, eps[0] if eps else None)
        eps.append(ep)
    if successful_only:
        eps = [e for e in eps if e.success]
    if not eps:
        raise UserError(f"dataset {root} has no successful episodes")
    return eps


def _check_belongs(ep: Episode, path: Path, spec: PolicySpec | None, first: Episode | None) -> None:
    """An episode must match its dataset's spec (or, in a dataset without one, the dataset's first episode)."""
    if spec is not None:
        want = {"task": spec.task, "control_mode": spec.control_mode, "state_layout": spec.state_layout,
                "action_dim": spec.action_dim, "cameras": {c.name: (c.height, c.width) for c in spec.cameras}}
    elif first is not None:
        want = _contract(first)
    else:
        return
    for key, value in _contract(ep).items():
        if value != want[key]:
            raise UserError(f"episode {path} does not belong to its dataset: {key} is {value!r}, the dataset's "
                            f"is {want[key]!r}")


def _contract(ep: Episode) -> dict:
    return {"task": ep.task, "control_mode": ep.control_mode, "state_layout": ep.state_layout,
            "action_dim": int(ep.actions.shape[1]), "cameras": {k: v.shape[1:3] for k, v in ep.images.items()}}


def dataset_spec(root: str | Path, require_episodes: bool = True) -> PolicySpec:
    """The PolicySpec a dataset was recorded with (stored in dataset.json)."""
    list_episodes(root, require_episodes)
    info = _dataset_info(Path(root))
    if not isinstance(info.get("spec"), dict):
        raise UserError(f"dataset {root} has no policy spec in dataset.json")
    return PolicySpec.from_dict(info["spec"])
