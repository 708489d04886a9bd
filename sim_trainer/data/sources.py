"""What `sft --data` accepts: an episode dataset directory, or `lerobot:DIR` (a LeRobotDataset v3.0, read in place).

The trainer asks every source the same three questions: its spec, its episode count (what a resumed run must
still see) and its successful episodes.
"""

from __future__ import annotations

from pathlib import Path

from policy_runtime import episodes
from policy_runtime.contract import PolicySpec
from policy_runtime.episodes import Episode
from sim_trainer.errors import UserError

LEROBOT_PREFIX = "lerobot:"


def _lerobot_root(source: str) -> Path | None:
    return Path(source[len(LEROBOT_PREFIX):]) if str(source).startswith(LEROBOT_PREFIX) else None


def source_path(source: str) -> Path:
    """The directory a source reads (an output must never be one of them)."""
    return _lerobot_root(source) or Path(source)


def dataset_spec(source: str) -> PolicySpec:
    root = _lerobot_root(source)
    if root is None:
        return episodes.dataset_spec(source)
    from sim_trainer.data.lerobot import read_lerobot

    spec = read_lerobot(root, with_frames=False).spec
    if spec is None:
        raise UserError(f"dataset {source} has no policy spec (its meta/vla_episodes.json carries none)")
    return spec


def episode_count(source: str) -> int:
    root = _lerobot_root(source)
    if root is None:
        return len(episodes.list_episodes(source))
    from sim_trainer.data.lerobot import lerobot_episode_count

    return lerobot_episode_count(root)


def load_dataset(source: str) -> list[Episode]:
    """The source's successful episodes (a LeRobot dataset without our metadata counts every episode as one)."""
    root = _lerobot_root(source)
    if root is None:
        return episodes.load_dataset(source)
    from sim_trainer.data.lerobot import read_lerobot

    eps = [ep for _, ep in read_lerobot(root).episodes if ep.success]
    if not eps:
        raise UserError(f"dataset {source} has no successful episodes")
    return eps
