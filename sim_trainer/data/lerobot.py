"""LeRobotDataset v3.0 export and import, written with pyarrow (the `lerobot` package is not needed).

Users of LeRobot keep their datasets in its v3.0 layout: parquet files of many episodes each, a per-episode
metadata table, a task table and `meta/info.json`. `export_lerobot` writes one of our episode datasets in that
layout (camera frames as lossless PNG `image` features, no video), `read_lerobot` reads one back as episodes.
What LeRobot has no field for (success, source, task id, control mode, state layout, provenance, the original
episode indices and dataset.json) travels in `meta/vla_episodes.json`, so ours -> LeRobot -> ours is exact; a
dataset without that file (recorded with LeRobot) gets the defaults documented in docs/datasets.md.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from policy_runtime.artifacts import (
    atomic_write_text,
    build_and_publish,
    claim_output_dir,
    is_bookkeeping,
    remove_if_empty,
)
from policy_runtime.contract import EPISODE_FORMAT, EPISODE_SOURCES, EPISODE_VERSION, CameraSpec, PolicySpec
from policy_runtime.episodes import Episode, EpisodeWriter, _dataset_info, list_episodes, read_episode
from sim_trainer.errors import UserError
from sim_trainer.run_dir import DATASET_ENTRIES, RunDir

CODEBASE_VERSION = "v3.0"
CHUNKS_SIZE = 1000  # files per chunk directory
DATA_FILES_SIZE_IN_MB = 100  # a data file is closed once it would grow past this
VIDEO_FILES_SIZE_IN_MB = 200
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
INFO, STATS, TASKS, SIDECAR = "meta/info.json", "meta/stats.json", "meta/tasks.parquet", "meta/vla_episodes.json"
LEROBOT_ENTRIES = frozenset({"meta", "data", "videos", "images", "README.md"})  # what export --force may replace

STATE, ACTION, IMAGE_PREFIX = "observation.state", "action", "observation.images."
REWARD, RECORDED_TIME = "next.reward", "recorded_timestamp"  # optional: our reward[t] and timestamps[t]
INDEX_FEATURES = ("timestamp", "frame_index", "episode_index", "index", "task_index")
QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}


# ----- export ---------------------------------------------------------------------------------------------------------
def export_lerobot(data: str | Path, out: str | Path, force: bool = False) -> dict:
    """Write the episode dataset `data` as a LeRobotDataset v3.0 in `out`; returns what was written.

    Built in a directory beside `out` and moved in at the end: a failure leaves `out` as it was. Episodes with no
    steps (a trial aborted before its first action) have no frames to store and are skipped (counted).
    """
    data, out = Path(data), Path(out)
    info = _dataset_info(data)
    paths = list_episodes(data)
    created = not os.path.lexists(out)
    out = claim_output_dir(out, force=force, inputs=(data,), what="LeRobot dataset directory")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in LEROBOT_ENTRIES and not is_bookkeeping(p.name))
    if foreign:
        raise UserError(f"--force only replaces a LeRobot dataset, but {out} also holds {', '.join(foreign[:3])}; "
                        "remove those or choose another --out")
    return build_and_publish(out, created, "lerobot", lambda staging: _write_lerobot(data, info, paths, staging),
                             _publish)


def _publish(staging: Path, out: Path) -> None:
    """Replace the LeRobot entries of `out` with the built ones; meta/ (info.json) goes last."""
    for name in sorted(LEROBOT_ENTRIES):
        if (out / name).is_dir() and not (out / name).is_symlink():
            shutil.rmtree(out / name)
        elif os.path.lexists(out / name):
            (out / name).unlink()
    for name in ("data", "meta"):
        os.replace(staging / name, out / name)


@dataclass
class _Layout:
    """What every exported episode must share: LeRobot has one feature schema and one fps per dataset."""

    state_dim: int
    action_dim: int
    cameras: dict[str, tuple[int, int]]
    fps: int
    reward: bool
    timestamps: bool

    @classmethod
    def of(cls, ep: Episode, path: Path, reward: bool, timestamps: bool) -> _Layout:
        hz = float(ep.control_hz)
        if not (hz > 0 and hz.is_integer()):
            raise UserError(f"{path}: LeRobot datasets need a whole number of frames per second, control_hz is {hz}")
        return cls(ep.state.shape[1], ep.actions.shape[1], {k: v.shape[1:3] for k, v in ep.images.items()}, int(hz),
                   reward, timestamps)

    def check(self, ep: Episode, path: Path) -> None:
        got = _Layout.of(ep, path, self.reward, self.timestamps)
        for key in ("state_dim", "action_dim", "cameras", "fps"):
            if getattr(got, key) != getattr(self, key):
                raise UserError(f"{path}: {key} is {getattr(got, key)}, the first episode's is {getattr(self, key)}; "
                                "a LeRobot dataset has one schema")


def _write_lerobot(data: Path, info: dict, paths: list[Path], root: Path) -> dict:
    """Write the whole LeRobot dataset into `root` (the staging directory); `info` is DATA's dataset.json."""
    heads = [read_episode(p, with_images=False) for p in paths]  # the schema before any frame is written
    kept = [(p, h) for p, h in zip(paths, heads, strict=True) if len(h)]
    if not kept:
        raise UserError(f"dataset {data} has only episodes without steps; there is nothing to export")
    first_path, first = kept[0]
    has_reward, has_time = any(h.reward is not None for _, h in kept), any(h.timestamps is not None for _, h in kept)
    layout = _Layout.of(read_episode(first_path), first_path, has_reward, has_time)
    features = _features(layout, first.state_layout)
    tasks: dict[str, int] = {}
    for _, h in kept:
        tasks.setdefault(h.instruction, len(tasks))

    writer = _DataWriter(root, _arrow_schema(features))
    rows, sidecar, totals = [], [], _StatsSet()
    frame = 0
    for e, (path, _) in enumerate(kept):
        ep = read_episode(path)
        layout.check(ep, path)
        table = _episode_table(ep, e, frame, tasks[ep.instruction], layout, features)
        chunk, file = writer.write(table)
        columns = _stats_columns(table, features, ep)
        totals.add(columns)
        rows.append({"episode_index": e, "tasks": [ep.instruction], "length": len(ep),
                     "data/chunk_index": chunk, "data/file_index": file, "dataset_from_index": frame,
                     "dataset_to_index": frame + len(ep),
                     **{f"stats/{k}/{s}": v for k, st in _StatsSet.of(columns).items() for s, v in st.items()},
                     "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
        sidecar.append({"index": int(path.stem.split("_")[1]), "success": ep.success, "source": ep.source,
                        "task": ep.task, "control_mode": ep.control_mode,
                        "state_layout": [list(x) for x in ep.state_layout], "provenance": ep.provenance,
                        "control_hz": ep.control_hz, "reward": ep.reward is not None,
                        "timestamps": ep.timestamps is not None})
        frame += len(ep)
    writer.close()

    meta = root / "meta"
    _write_parquet(pa.Table.from_pylist(rows), root / EPISODES_PATH.format(chunk_index=0, file_index=0))
    _write_parquet(pa.table({"task_index": pa.array(list(tasks.values()), pa.int64()),
                             "__index_level_0__": list(tasks)}), meta / "tasks.parquet", pandas_index=True)
    lerobot_info = {"codebase_version": CODEBASE_VERSION, "robot_type": None, "total_episodes": len(kept),
                    "total_frames": frame, "total_tasks": len(tasks), "chunks_size": CHUNKS_SIZE,
                    "data_files_size_in_mb": DATA_FILES_SIZE_IN_MB, "video_files_size_in_mb": VIDEO_FILES_SIZE_IN_MB,
                    "fps": layout.fps, "splits": {"train": f"0:{len(kept)}"}, "data_path": DATA_PATH,
                    "video_path": None, "features": features}
    atomic_write_text(root / STATS, json.dumps(totals.result(), indent=4))
    atomic_write_text(root / SIDECAR, json.dumps({"format": EPISODE_FORMAT, "version": EPISODE_VERSION,
                                                  "dataset": info, "episodes": sidecar}, indent=2))
    atomic_write_text(root / INFO, json.dumps(lerobot_info, indent=4))
    return {"episodes": len(kept), "frames": frame, "skipped_empty": len(paths) - len(kept), "fps": layout.fps,
            "cameras": sorted(layout.cameras)}


def _features(layout: _Layout, state_layout: tuple[tuple[str, int], ...]) -> dict:
    """info.json's features: LeRobot's names for our state, actions and cameras, then its index columns."""
    names = [n if k == 1 else f"{n}[{i}]" for n, k in state_layout for i in range(k)]
    feats = {STATE: {"dtype": "float32", "shape": [layout.state_dim], "names": names},
             ACTION: {"dtype": "float32", "shape": [layout.action_dim],
                      "names": [f"action_{i}" for i in range(layout.action_dim)]}}
    for cam, (h, w) in layout.cameras.items():
        feats[IMAGE_PREFIX + cam] = {"dtype": "image", "shape": [h, w, 3], "names": ["height", "width", "channels"]}
    if layout.reward:
        feats[REWARD] = {"dtype": "float32", "shape": [1], "names": None}
    if layout.timestamps:
        feats[RECORDED_TIME] = {"dtype": "float64", "shape": [1], "names": None}
    feats["timestamp"] = {"dtype": "float32", "shape": [1], "names": None}
    for key in INDEX_FEATURES[1:]:
        feats[key] = {"dtype": "int64", "shape": [1], "names": None}
    return feats


def _arrow_type(ft: dict) -> pa.DataType:
    if ft["dtype"] == "image":
        return pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    scalar = pa.from_numpy_dtype(np.dtype(ft["dtype"]))
    return scalar if ft["shape"] == [1] else pa.list_(scalar, ft["shape"][0])


def _hf_feature(ft: dict) -> dict:
    """The Hugging Face `datasets` description of a column, so datasets decodes the PNG structs as images."""
    if ft["dtype"] == "image":
        return {"_type": "Image"}
    value = {"dtype": ft["dtype"], "_type": "Value"}
    return value if ft["shape"] == [1] else {"feature": value, "length": ft["shape"][0], "_type": "List"}


def _arrow_schema(features: dict) -> pa.Schema:
    hf = json.dumps({"info": {"features": {k: _hf_feature(ft) for k, ft in features.items()}}})
    return pa.schema([(k, _arrow_type(ft)) for k, ft in features.items()], metadata={"huggingface": hf})


def _png(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def _decode_png(data: bytes) -> np.ndarray:
    """[H, W, 3] uint8 RGB (a grey or RGBA frame of another recorder is converted)."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)


def _episode_table(ep: Episode, episode_index: int, start: int, task_index: int, layout: _Layout,
                   features: dict) -> pa.Table:
    t = len(ep)
    cols: dict[str, pa.Array] = {
        STATE: _vectors(ep.state.astype(np.float32)),
        ACTION: _vectors(ep.actions.astype(np.float32)),
    }
    for cam in layout.cameras:
        cols[IMAGE_PREFIX + cam] = pa.array([{"bytes": _png(f), "path": None} for f in ep.images[cam]],
                                            _arrow_type(features[IMAGE_PREFIX + cam]))
    if layout.reward:
        cols[REWARD] = pa.array(np.zeros(t, np.float32) if ep.reward is None else np.asarray(ep.reward, np.float32))
    if layout.timestamps:
        cols[RECORDED_TIME] = pa.array(np.zeros(t) if ep.timestamps is None else np.asarray(ep.timestamps, np.float64))
    frames = np.arange(t, dtype=np.int64)
    cols["timestamp"] = pa.array((frames / layout.fps).astype(np.float32))
    cols["frame_index"] = pa.array(frames)
    cols["episode_index"] = pa.array(np.full(t, episode_index, np.int64))
    cols["index"] = pa.array(start + frames)
    cols["task_index"] = pa.array(np.full(t, task_index, np.int64))
    return pa.table(cols, schema=_arrow_schema(features))


def _vectors(x: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


class _DataWriter:
    """data/chunk-XXX/file-YYY.parquet: episodes appended to one file until it would pass the size limit."""

    def __init__(self, root: Path, schema: pa.Schema):
        self.root, self.schema = root, schema
        self.chunk, self.file, self.size, self.writer = 0, 0, 0, None

    def write(self, table: pa.Table) -> tuple[int, int]:
        nbytes = table.nbytes  # PNG frames are compressed already: close to the bytes on disk
        if self.writer is not None and self.size + nbytes > DATA_FILES_SIZE_IN_MB * 1024 * 1024:
            self.close()
            self.chunk, self.file = (self.chunk + 1, 0) if self.file == CHUNKS_SIZE - 1 else (self.chunk, self.file + 1)
        if self.writer is None:
            path = self.root / DATA_PATH.format(chunk_index=self.chunk, file_index=self.file)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.writer, self.size = pq.ParquetWriter(path, self.schema, compression="snappy"), 0
        self.writer.write_table(table)
        self.size += nbytes
        return self.chunk, self.file

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _write_parquet(table: pa.Table, path: Path, pandas_index: bool = False) -> None:
    """A small metadata table; with `pandas_index`, the column __index_level_0__ is the pandas index (tasks)."""
    if pandas_index:
        pandas_meta = {"index_columns": ["__index_level_0__"], "column_indexes": [], "columns": [
            {"name": None, "field_name": "__index_level_0__", "pandas_type": "unicode", "numpy_type": "object",
             "metadata": None},
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
             "metadata": None}], "creator": {"library": "pyarrow", "version": pa.__version__}}
        table = table.replace_schema_metadata({"pandas": json.dumps(pandas_meta)})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="snappy")


# ----- statistics -----------------------------------------------------------------------------------------------------
@dataclass
class _Pixels:
    """An image column's pixel counts per channel ([3, 256]) and its number of frames: exact statistics, small."""

    counts: np.ndarray
    frames: int

    @classmethod
    def of(cls, frames: np.ndarray) -> _Pixels:
        return cls(np.stack([np.bincount(frames[..., c].ravel(), minlength=256) for c in range(3)]), len(frames))

    def __add__(self, other: _Pixels) -> _Pixels:
        return _Pixels(self.counts + other.counts, self.frames + other.frames)


class _StatsSet:
    """Exact per-feature statistics (LeRobot's keys) over episodes: vectors kept whole, images as pixel counts."""

    def __init__(self):
        self.parts: dict[str, list] = {}

    def add(self, columns: dict[str, np.ndarray | _Pixels]) -> None:
        for key, value in columns.items():
            self.parts.setdefault(key, []).append(value)

    @staticmethod
    def of(columns: dict[str, np.ndarray | _Pixels]) -> dict[str, dict]:
        return {k: _image_stats(v) if isinstance(v, _Pixels) else _vector_stats(v) for k, v in columns.items()}

    def result(self) -> dict[str, dict]:
        return {k: _image_stats(sum(v[1:], v[0])) if isinstance(v[0], _Pixels) else _vector_stats(np.concatenate(v))
                for k, v in self.parts.items()}


def _stats_columns(table: pa.Table, features: dict, ep: Episode) -> dict[str, np.ndarray | _Pixels]:
    """Each numeric column as [T, D] values, each camera as the pixel counts of its frames (PNG is lossless)."""
    out: dict[str, np.ndarray | _Pixels] = {}
    for key, ft in features.items():
        col = table.column(key).combine_chunks()
        if ft["dtype"] == "image":
            out[key] = _Pixels.of(ep.images[key[len(IMAGE_PREFIX):]])
        elif ft["shape"] == [1]:
            out[key] = col.to_numpy().reshape(-1, 1)
        else:
            out[key] = col.flatten().to_numpy().reshape(len(col), -1)
    return out


def _vector_stats(x: np.ndarray) -> dict:
    x64 = x.astype(np.float64)
    stats = {"min": x.min(axis=0).tolist(), "max": x.max(axis=0).tolist(), "mean": x64.mean(axis=0).tolist(),
             "std": x64.std(axis=0).tolist(), "count": [len(x)]}
    return stats | {k: np.quantile(x64, q, axis=0).tolist() for k, q in QUANTILES.items()}


def _image_stats(pixels: _Pixels) -> dict:
    """Per-channel statistics of pixel values in [0, 1], shaped [3, 1, 1] as LeRobot stores them (exact)."""
    counts, values = pixels.counts, np.arange(256, dtype=np.float64)
    n = counts.sum(axis=1).astype(np.float64)
    mean = counts @ values / n
    stats = {"min": np.array([np.flatnonzero(c)[0] for c in counts], np.float64),
             "max": np.array([np.flatnonzero(c)[-1] for c in counts], np.float64),
             "mean": mean, "std": np.sqrt(np.maximum(counts @ values**2 / n - mean**2, 0.0))}
    stats |= {k: np.array([_hist_quantile(c, q) for c in counts]) for k, q in QUANTILES.items()}
    return {**{k: (v / 255.0).reshape(3, 1, 1).tolist() for k, v in stats.items()}, "count": [pixels.frames]}


def _hist_quantile(counts: np.ndarray, q: float) -> float:
    """numpy's default (linear) quantile of the integer values a histogram counts."""
    cum = np.cumsum(counts)
    pos = q * (cum[-1] - 1)
    below, frac = int(math.floor(pos)), pos - math.floor(pos)
    a = int(np.searchsorted(cum, below, side="right"))
    b = int(np.searchsorted(cum, min(below + 1, cum[-1] - 1), side="right"))
    return a + frac * (b - a)


# ----- import ---------------------------------------------------------------------------------------------------------
@dataclass
class LeRobotData:
    """A LeRobot dataset as ours: the dataset.json it becomes (spec and metadata) and (index, episode) pairs."""

    spec: PolicySpec | None
    meta: dict
    episodes: list[tuple[int, Episode]]


def import_lerobot(src: str | Path, out: str | Path, force: bool = False, source: str = "real") -> dict:
    """Write the LeRobot v3.0 dataset `src` as an episode dataset in `out` (everything is read and checked first)."""
    created = not os.path.lexists(out)
    run_dir = RunDir(out, what="an episode dataset", force=force, replaceable=DATASET_ENTRIES, inputs=(src,))
    try:
        data = read_lerobot(src, source=source)
    except BaseException:
        if created:
            remove_if_empty(Path(out))
        raise
    with run_dir as root:
        writer = EpisodeWriter(root, spec=data.spec, meta=data.meta)
        for index, ep in data.episodes:
            writer.write(ep, index=index)
    return {"episodes": len(data.episodes), "frames": sum(len(ep) for _, ep in data.episodes)}


def read_lerobot(root: str | Path, source: str = "real", with_frames: bool = True) -> LeRobotData:
    """Read a LeRobot v3.0 dataset; every inconsistency between its metadata and its files is one clear line.

    Without frames only the metadata and the action column are read (enough for the spec).
    """
    root = Path(root)
    if source not in EPISODE_SOURCES:
        raise UserError(f"--source must be one of {', '.join(EPISODE_SOURCES)}, got {source!r}")
    info = _lerobot_info(root)
    features, fps = info["features"], info["fps"]
    cameras = _cameras(features)
    tasks = _tasks(root)
    table = _episodes_table(root, info)
    sidecar = _sidecar(root, len(table["episode_index"]))
    extras = [k for k in (REWARD, RECORDED_TIME) if k in features]
    columns = [STATE, ACTION, *(IMAGE_PREFIX + c for c in cameras), *extras, *INDEX_FEATURES] if with_frames \
        else [ACTION, "episode_index"]
    rows = _data_rows(root, info, table, columns)
    episodes = []
    for i, e in enumerate(table["episode_index"]):
        cols = _episode_rows(rows, table, i, e)
        if with_frames:
            episodes.append(_episode(root, e, cols, features, cameras, tasks, fps, source,
                                     sidecar["episodes"][i] if sidecar else None, info.get("robot_type")))
        else:
            episodes.append((e, _vector_column(cols[ACTION], features[ACTION], ACTION, f"{root}: episode {e}")))
    if sidecar:
        d = sidecar["dataset"]
        spec = PolicySpec.from_dict(d["spec"]) if isinstance(d.get("spec"), dict) else None
        meta = {k: v for k, v in d.items() if k not in ("format", "version", "spec")}
        return LeRobotData(spec, meta, episodes if with_frames else [])
    actions = np.concatenate([ep.actions for _, ep in episodes] if with_frames else [a for _, a in episodes])
    spec = PolicySpec(
        task=root.resolve().name, control_mode="unspecified", obs_mode="rgb" if cameras else "state",
        cameras=tuple(CameraSpec(c, h, w) for c, (h, w) in cameras.items()),
        state_layout=((STATE, features[STATE]["shape"][0]),), action_dim=features[ACTION]["shape"][0],
        action_low=tuple(map(float, actions.min(axis=0))), action_high=tuple(map(float, actions.max(axis=0))),
        control_hz=float(fps), instruction=tasks[min(tasks)] if tasks else "")
    meta = {"generator": "lerobot-import", "lerobot_dataset": str(root.resolve()), "robot_type": info.get("robot_type")}
    return LeRobotData(spec, meta, episodes if with_frames else [])


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"corrupt {path}: {e}") from None


def _lerobot_info(root: Path) -> dict:
    if not root.is_dir():
        raise UserError(f"LeRobot dataset {root} " + ("is a file, not a directory" if root.exists() else
                                                      "does not exist"))
    if not (root / INFO).is_file():
        raise UserError(f"{root} is not a LeRobot dataset (no {INFO})")
    info = _read_json(root / INFO)
    if not isinstance(info, dict) or not isinstance(info.get("features"), dict):
        raise UserError(f"{root / INFO} has no features")
    version = info.get("codebase_version")
    if not isinstance(version, str) or not version.startswith("v3."):
        raise UserError(f"{root} is a LeRobot dataset of codebase_version {version!r}; this reads v3.0 (convert it "
                        "with LeRobot's lerobot.datasets.v30.convert_dataset_v21_to_v30 first)")
    fps = info.get("fps")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise UserError(f"{root / INFO}: fps must be a positive number, got {fps!r}")
    feats = info["features"]
    odd = [k for k, ft in feats.items() if not isinstance(ft, dict)]
    if odd:
        raise UserError(f"{root / INFO}: feature {odd[0]!r} is not an object with dtype, shape and names")
    for key in (STATE, ACTION):
        ft = feats.get(key)
        if not isinstance(ft, dict) or ft.get("dtype") not in ("float32", "float64") or len(ft.get("shape", [])) != 1:
            raise UserError(f"{root / INFO}: feature {key!r} must be a float vector (dtype float32, shape [n]), got "
                            f"{ft!r}")
    videos = [k for k, ft in feats.items() if isinstance(ft, dict) and ft.get("dtype") == "video"]
    if videos:
        raise UserError(f"{root} stores {', '.join(videos)} as video; only image features (PNG frames) are read "
                        "(re-encode the dataset with image features, or drop the video keys)")
    return info


def _cameras(features: dict) -> dict[str, tuple[int, int]]:
    """Camera name -> (height, width) of each image feature `observation.images.<camera>`."""
    out = {}
    for key, ft in features.items():
        if ft.get("dtype") != "image":
            continue
        shape, names = list(ft.get("shape") or []), list(ft.get("names") or [])
        if not key.startswith(IMAGE_PREFIX) or len(shape) != 3:
            raise UserError(f"image feature {key!r} must be observation.images.<camera> with a 3-D shape, got {shape}")
        channels_first = bool(names) and names[0] in ("channel", "channels")
        h, w = shape[1:] if channels_first else shape[:2]
        out[key[len(IMAGE_PREFIX):]] = (int(h), int(w))
    return out


def _parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    if not path.is_file():
        raise UserError(f"LeRobot dataset file {path} is missing")
    try:
        schema = pq.read_schema(path)
        missing = [c for c in columns or [] if c not in schema.names]
        if missing:
            raise UserError(f"{path} has no column {', '.join(missing)}")
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"corrupt {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _tasks(root: Path) -> dict[int, str]:
    """task_index -> task text; the text is the pandas index of meta/tasks.parquet."""
    table = _parquet(root / TASKS, None)
    meta = json.loads((table.schema.metadata or {}).get(b"pandas", b"{}"))
    index = next((c for c in meta.get("index_columns", []) if isinstance(c, str)), "task")
    if index not in table.column_names or "task_index" not in table.column_names:
        raise UserError(f"{root / TASKS} has no task text and task_index columns")
    return dict(zip(table["task_index"].to_pylist(), table[index].to_pylist(), strict=True))


def _episodes_table(root: Path, info: dict) -> dict[str, list]:
    files = sorted((root / "meta" / "episodes").glob("*/*.parquet"))
    if not files:
        raise UserError(f"{root} is not a LeRobot dataset (no meta/episodes/chunk-*/file-*.parquet)")
    keys = ["episode_index", "length", "dataset_from_index", "dataset_to_index", "data/chunk_index", "data/file_index"]
    table = pa.concat_tables([_parquet(f, keys) for f in files]).sort_by("episode_index")
    out = {k: table[k].to_pylist() for k in keys}
    if out["episode_index"] != list(range(len(out["episode_index"]))):
        raise UserError(f"{root}/meta/episodes: episode_index must run 0..N-1, got {out['episode_index'][:5]}...")
    if info.get("total_episodes") not in (None, len(out["episode_index"])):
        raise UserError(f"{root / INFO} says {info['total_episodes']} episodes, meta/episodes lists "
                        f"{len(out['episode_index'])}")
    return out


def _sidecar(root: Path, num_episodes: int) -> dict | None:
    """meta/vla_episodes.json (written by export_lerobot), checked; None for a dataset recorded with LeRobot."""
    if not (root / SIDECAR).exists():
        return None
    side = _read_json(root / SIDECAR)
    if not isinstance(side, dict) or side.get("format") != EPISODE_FORMAT or not isinstance(side.get("dataset"), dict) \
            or not isinstance(side.get("episodes"), list):
        raise UserError(f"{root / SIDECAR} does not describe {EPISODE_FORMAT} episodes")
    if len(side["episodes"]) != num_episodes:
        raise UserError(f"{root / SIDECAR} describes {len(side['episodes'])} episodes, the dataset has {num_episodes}")
    return side


def _data_rows(root: Path, info: dict, table: dict, columns: list[str]) -> dict[tuple[int, int], pa.Table]:
    """Every data file the episodes point at, with the columns needed."""
    template = info.get("data_path") or DATA_PATH
    files = sorted(set(zip(table["data/chunk_index"], table["data/file_index"], strict=True)))
    try:
        paths = {(c, f): root / template.format(chunk_index=c, file_index=f) for c, f in files}
    except (AttributeError, KeyError, IndexError, ValueError):
        raise UserError(f"{root / INFO}: data_path {template!r} is not a chunk/file path template") from None
    return {key: _parquet(path, columns) for key, path in paths.items()}


def _episode_rows(rows: dict, table: dict, i: int, e: int) -> dict[str, pa.ChunkedArray]:
    """Episode e's rows of its data file, in frame order, checked against meta/episodes."""
    key = (table["data/chunk_index"][i], table["data/file_index"][i])
    data = rows[key]
    mask = np.flatnonzero(data["episode_index"].to_numpy() == e)
    part = data.take(pa.array(mask))
    n, start = table["length"][i], table["dataset_from_index"][i]
    where = f"episode {e} (data file chunk {key[0]}, file {key[1]})"
    if len(part) != n or table["dataset_to_index"][i] - start != n:
        raise UserError(f"{where}: meta/episodes says {n} frames from index {start} to "
                        f"{table['dataset_to_index'][i]}, the data file holds {len(part)}")
    if "frame_index" in part.column_names:
        order = np.argsort(part["frame_index"].to_numpy(), kind="stable")
        part = part.take(pa.array(order))
        if not np.array_equal(part["frame_index"].to_numpy(), np.arange(n)) or \
                not np.array_equal(part["index"].to_numpy(), start + np.arange(n)):
            raise UserError(f"{where}: frame_index/index are not 0..{n - 1} / {start}..{start + n - 1}")
    return {k: part[k] for k in part.column_names}


def _vector_column(col: pa.ChunkedArray, ft: dict, key: str, where: str) -> np.ndarray:
    """[T, n] float32 of a vector column; a width other than info.json's shape is refused."""
    arr = col.combine_chunks()
    width = ft["shape"][0]
    if pa.types.is_fixed_size_list(arr.type):
        got = {arr.type.list_size}
    elif pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        got = set(arr.value_lengths().to_numpy(zero_copy_only=False).tolist())
    else:
        raise UserError(f"{where}: column {key} is {arr.type}, not a list of floats")
    if got - {width}:
        raise UserError(f"{where}: {key} has vectors of length {sorted(got)}, meta/info.json says shape [{width}]")
    return arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(arr), width)


def _frames(root: Path, col: pa.ChunkedArray, key: str, hw: tuple[int, int], where: str) -> np.ndarray:
    """[T, H, W, 3] uint8 of a PNG image column (embedded bytes, or a path relative to the dataset)."""
    out = []
    for item in col.to_pylist():
        if not isinstance(item, dict):
            raise UserError(f"{where}: {key} is not an image column ({{bytes, path}} structs)")
        data = item.get("bytes")
        if data is None and item.get("path"):
            data = _read_bytes(root / item["path"])
        if data is None:
            raise UserError(f"{where}: {key} has a frame with neither bytes nor path")
        try:
            frame = _decode_png(data)
        except (OSError, ValueError) as e:
            raise UserError(f"{where}: {key} holds a frame that is not an image ({e})") from None
        if frame.shape[:2] != hw:
            raise UserError(f"{where}: {key} frames are {frame.shape[0]}x{frame.shape[1]}, meta/info.json says "
                            f"{hw[0]}x{hw[1]}")
        out.append(frame)
    return np.stack(out) if out else np.zeros((0, *hw, 3), np.uint8)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read frame {path}: {e.strerror}") from None


def _episode(root: Path, e: int, cols: dict, features: dict, cameras: dict, tasks: dict, fps: float, source: str,
             side: dict | None, robot_type: str | None) -> tuple[int, Episode]:
    where = f"{root}: episode {e}"
    state = _vector_column(cols[STATE], features[STATE], STATE, where)
    actions = _vector_column(cols[ACTION], features[ACTION], ACTION, where)
    images = {c: _frames(root, cols[IMAGE_PREFIX + c], IMAGE_PREFIX + c, hw, where) for c, hw in cameras.items()}
    task_index = cols["task_index"].to_pylist()
    if task_index and task_index[0] not in tasks:
        raise UserError(f"{where}: task_index {task_index[0]} is not in {TASKS}")
    instruction = tasks[task_index[0]] if task_index else ""
    reward = cols[REWARD].to_numpy().astype(np.float32) if REWARD in cols else None
    stamps = cols[RECORDED_TIME].to_numpy().astype(np.float64) if RECORDED_TIME in cols else None
    if side is None:  # recorded with LeRobot: its timestamps, our defaults for what it has no field for
        ep = Episode(state=state, actions=actions, images=images, instruction=instruction, success=True,
                     control_hz=float(fps), source=source, task=root.resolve().name, control_mode="unspecified",
                     state_layout=((STATE, state.shape[1]),),
                     provenance={"generator": "lerobot-import", "lerobot_episode_index": e, "robot_type": robot_type},
                     reward=reward, timestamps=np.asarray(cols["timestamp"].to_numpy(), np.float64)
                     if "timestamp" in cols else None)
        return e, ep.validate()
    try:
        ep = Episode(state=state, actions=actions, images=images, instruction=instruction,
                     success=bool(side["success"]), control_hz=float(side["control_hz"]), source=str(side["source"]),
                     task=str(side["task"]), control_mode=str(side["control_mode"]),
                     state_layout=tuple((str(n), int(k)) for n, k in side["state_layout"]),
                     provenance=dict(side["provenance"]), reward=reward if side["reward"] else None,
                     timestamps=stamps if side["timestamps"] else None)
        index = int(side["index"])
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{root / SIDECAR}: episode {e} is malformed ({err!r})") from None
    return index, ep.validate()


def lerobot_episode_count(root: str | Path) -> int:
    """The number of episodes of a LeRobot dataset (its metadata checked, no frame read)."""
    root = Path(root)
    return len(_episodes_table(root, _lerobot_info(root))["episode_index"])
