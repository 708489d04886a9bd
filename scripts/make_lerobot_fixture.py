"""Write tests/fixtures/lerobot_written: a tiny LeRobotDataset v3.0 recorded with the real `lerobot` package.

Runs in the LeRobot reference venv (scripts/lerobot_reference_venv.sh), not in the project's:

    HF_HUB_OFFLINE=1 .venv-lerobot/bin/python scripts/make_lerobot_fixture.py [OUT]

OUT (default tests/fixtures/lerobot_written) gets `dataset/` (what LeRobotDataset.create, add_frame, save_episode
and finalize wrote) and `expected.json` (the frames that were added), so the project's importer is tested against
LeRobot's own files, not only against our exporter.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

FPS = 10
EPISODES = [(4, "stack the red block on the blue one"), (3, "open the drawer")]


def frame_values(e: int, t: int) -> dict:
    """Arithmetic values, so expected.json states them exactly."""
    state = (np.arange(3) + 10 * e + t).astype(np.float32) / 4
    action = (np.arange(2) - t + e).astype(np.float32) / 8
    image = ((np.arange(12 * 12 * 3).reshape(12, 12, 3) * (5 + e) + 17 * t) % 256).astype(np.uint8)
    return {"observation.state": state, "action": action, "observation.images.front": image}


def main() -> None:
    from lerobot import __version__
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parents[1] / "tests/fixtures/lerobot_written"
    p.add_argument("out", nargs="?", default=str(default), help=f"output directory (default {default})")
    out = Path(p.parse_args().out)
    shutil.rmtree(out, ignore_errors=True)
    features = {
        "observation.state": {"dtype": "float32", "shape": (3,), "names": ["joint_0", "joint_1", "gripper"]},
        "action": {"dtype": "float32", "shape": (2,), "names": ["joint_0.vel", "gripper.cmd"]},
        "observation.images.front": {"dtype": "image", "shape": (12, 12, 3), "names": ["height", "width", "channels"]},
    }
    ds = LeRobotDataset.create("local/lerobot_written", fps=FPS, root=out / "dataset", features=features,
                               robot_type="so100", use_videos=False)
    expected = []
    for e, (length, task) in enumerate(EPISODES):
        frames = [frame_values(e, t) for t in range(length)]
        for f in frames:
            ds.add_frame({**f, "task": task})
        ds.save_episode()
        expected.append({"episode_index": e, "task": task,
                         "state": [f["observation.state"].tolist() for f in frames],
                         "action": [f["action"].tolist() for f in frames],
                         "images": {"front": [f["observation.images.front"].tolist() for f in frames]}})
    ds.finalize()
    (out / "expected.json").write_text(json.dumps({"lerobot": __version__, "fps": FPS,
                                                   "lengths": [n for n, _ in EPISODES], "episodes": expected}))
    print(f"wrote {out} with lerobot {__version__}")


if __name__ == "__main__":
    main()
