"""Check an `export-lerobot` export with the real LeRobot reader against the episode dataset it came from.

Runs in the LeRobot reference venv (scripts/lerobot_reference_venv.sh); the episodes are read by the project's own
reader in the project's venv (a subprocess of this script, `--dump`), since the two venvs cannot be one:

    sim-trainer dataset export-lerobot DATA --out EXPORT
    HF_HUB_OFFLINE=1 .venv-lerobot/bin/python scripts/check_lerobot_export.py DATA EXPORT [--project-python PY]

`LeRobotDataset(repo_id, root=EXPORT)` must give every frame of every non-empty episode exactly (state, action,
camera pixels, task, episode and frame index, timestamp = frame / fps), the episode boundaries, action chunks with
`delta_timestamps` as SFT builds them (padded with the last action), and `meta.stats` equal to the statistics of
the episodes' frames. Prints one line per check; exit 0 when all pass, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 4  # action chunk length checked with delta_timestamps
QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}


def dump(data: str, out: str) -> None:
    """Project venv: the non-empty episodes of DATA, in order, as one .npz (read by policy_runtime.episodes)."""
    from policy_runtime.episodes import list_episodes, read_episode

    arrays, meta = {}, []
    for path in list_episodes(data):
        ep = read_episode(path)
        if not len(ep):
            continue
        i = len(meta)
        arrays[f"{i}/state"], arrays[f"{i}/actions"] = ep.state, ep.actions
        arrays |= {f"{i}/images/{cam}": frames for cam, frames in ep.images.items()}
        meta.append({"file": path.name, "instruction": ep.instruction, "control_hz": ep.control_hz,
                     "cameras": list(ep.images)})
    np.savez(out, meta=json.dumps(meta), **arrays)


class Checks:
    def __init__(self):
        self.failed = 0

    def __call__(self, ok: bool, what: str) -> None:
        print(f"{'ok  ' if ok else 'FAIL'} {what}")
        self.failed += not ok


def stats_match(got: dict, values: np.ndarray, shape: tuple[int, ...]) -> bool:
    """LeRobot's stats of one feature against numpy over the values ([N, D] rows)."""
    want = {"min": values.min(0), "max": values.max(0), "mean": values.mean(0), "std": values.std(0)}
    want |= {k: np.quantile(values, q, axis=0) for k, q in QUANTILES.items()}
    return all(np.allclose(np.asarray(got[k], np.float64).reshape(shape), v.reshape(shape), rtol=1e-6, atol=1e-6)
               for k, v in want.items())


def check(data: str, export: str, project_python: str) -> int:
    import lerobot
    import torch
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    with tempfile.TemporaryDirectory() as tmp:
        npz = os.path.join(tmp, "episodes.npz")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        subprocess.run([project_python, __file__, "--dump", data, npz], check=True, env=env)
        loaded = np.load(npz)
        meta = json.loads(str(loaded["meta"]))
        eps = [{k.split("/", 1)[1]: loaded[k] for k in loaded.files if k.startswith(f"{i}/")} for i in range(len(meta))]

    print(f"lerobot {lerobot.__version__}, torch {torch.__version__}, numpy {np.__version__}; {data} -> {export}")
    c = Checks()
    ds = LeRobotDataset("local/export-check", root=export)
    lengths = [len(e["actions"]) for e in eps]
    fps = meta[0]["control_hz"]
    c(ds.meta.info["codebase_version"] == "v3.0", f"codebase_version {ds.meta.info['codebase_version']}")
    c(ds.num_episodes == len(eps) and len(ds) == sum(lengths),
      f"{ds.num_episodes} episodes, {len(ds)} frames (ours: {len(eps)} non-empty episodes, {sum(lengths)} steps)")
    c(ds.fps == fps, f"fps {ds.fps} (control_hz {fps})")

    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int)
    bounds = all(ds.meta.episodes[e]["dataset_from_index"] == starts[e] and
                 ds.meta.episodes[e]["dataset_to_index"] == starts[e] + lengths[e] and
                 ds.meta.episodes[e]["length"] == lengths[e] and
                 list(ds.meta.episodes[e]["tasks"]) == [meta[e]["instruction"]] for e in range(len(eps)))
    c(bounds, "episode boundaries (dataset_from_index, dataset_to_index, length) and tasks")

    bad = []
    for e, ep in enumerate(eps):
        for t in range(lengths[e]):
            item = ds[int(starts[e] + t)]
            same = (item["episode_index"].item() == e and item["frame_index"].item() == t
                    and abs(item["timestamp"].item() - t / fps) < 1e-6 and item["task"] == meta[e]["instruction"]
                    and np.array_equal(item["observation.state"].numpy(), ep["state"][t])
                    and np.array_equal(item["action"].numpy(), ep["actions"][t]))
            for cam in meta[e]["cameras"]:
                pixels = (item[f"observation.images.{cam}"] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
                same = same and np.array_equal(pixels, ep[f"images/{cam}"][t])
            if not same:
                bad.append((e, t))
    cams = ", ".join(meta[0]["cameras"]) or "no camera"
    c(not bad, f"every frame exact: state, action, {cams} pixels, task, episode/frame index, timestamp"
               + (f" (differs at {bad[:3]})" if bad else ""))

    chunked = LeRobotDataset("local/export-check", root=export,
                             delta_timestamps={"action": [k / fps for k in range(CHUNK)]})
    bad = []
    for e, ep in enumerate(eps):
        for t in range(lengths[e]):
            item = chunked[int(starts[e] + t)]
            idx = np.minimum(np.arange(t, t + CHUNK), lengths[e] - 1)
            pad = np.arange(t, t + CHUNK) >= lengths[e]
            if not (np.array_equal(item["action"].numpy(), ep["actions"][idx])
                    and np.array_equal(item["action_is_pad"].numpy(), pad)):
                bad.append((e, t))
    c(not bad, f"action chunks of {CHUNK} with delta_timestamps = our chunks (last action repeated, padding flagged)")

    state = np.concatenate([e["state"] for e in eps]).astype(np.float64)
    action = np.concatenate([e["actions"] for e in eps]).astype(np.float64)
    stats = ds.meta.stats
    c(stats_match(stats["observation.state"], state, (-1,)), "meta.stats observation.state: min max mean std q01-q99")
    c(stats_match(stats["action"], action, (-1,)), "meta.stats action: min max mean std q01-q99")
    for cam in meta[0]["cameras"]:
        pixels = np.concatenate([e[f"images/{cam}"] for e in eps]).reshape(-1, 3).astype(np.float64) / 255
        key = f"observation.images.{cam}"
        c(stats_match(stats[key], pixels, (3, 1, 1)) and int(stats[key]["count"][0]) == sum(lengths),
          f"meta.stats {key}: per-channel min max mean std q01-q99 of pixels in [0, 1]")
    print("all checks passed" if not c.failed else f"{c.failed} checks FAILED")
    return 1 if c.failed else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", help="the episode dataset that was exported")
    p.add_argument("export", help="the LeRobot dataset export-lerobot wrote")
    p.add_argument("--project-python", default=str(ROOT / ".venv/bin/python"),
                   help="the project venv's python, which reads DATA (default .venv/bin/python of this checkout)")
    p.add_argument("--dump", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.dump:
        dump(a.data, a.export)
        return 0
    return check(a.data, a.export, a.project_python)


if __name__ == "__main__":
    sys.exit(main())
