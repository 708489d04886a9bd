"""LeRobotDataset v3.0 export and import: a golden export, exact round trips, LeRobot's own files, bad input.

The golden export (tests/fixtures/lerobot_tiny) is what `export-lerobot` writes for `tiny_dataset()`; rewrite it
after an intended format change with `PYTHONPATH=. python tests/test_lerobot.py`. tests/fixtures/lerobot_written
was written by the real `lerobot` package (scripts/make_lerobot_fixture.py, in the reference venv).
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from policy_runtime.contract import CameraSpec, PolicySpec
from policy_runtime.episodes import Episode, EpisodeWriter, list_episodes, load_dataset, read_episode
from sim_trainer.data import lerobot, sources
from sim_trainer.errors import UserError
from tests.bad_input import assert_refused_unchanged, run_cli

FIXTURES = Path(__file__).resolve().parent / "fixtures"
GOLDEN = FIXTURES / "lerobot_tiny"
WRITTEN = FIXTURES / "lerobot_written"  # recorded with LeRobot itself
CAMERAS = ("base_camera", "wrist")
LAYOUT = (("agent/qpos", 3), ("extra/goal", 1))


def _episode(t: int, k: int, **kw) -> Episode:
    """Arithmetic (not random) values: the same bytes on every platform and numpy version."""
    s, a = sum(n for _, n in LAYOUT), 2
    images = {c: ((np.arange(t * 16 * 16 * 3).reshape(t, 16, 16, 3) * (37 + 11 * i + k)) % 256).astype(np.uint8)
              for i, c in enumerate(CAMERAS)}
    base = dict(state=(np.arange(t * s).reshape(t, s) * 0.25 - 1.5 + k).astype(np.float32),
                actions=((np.arange(t * a).reshape(t, a) % 7) / 7 - 0.5 + k / 8).astype(np.float32), images=images,
                instruction="push the cube to the goal", success=True, control_hz=20.0, source="sim",
                task="PushCube-v1", control_mode="pd_joint_delta_pos", state_layout=LAYOUT,
                provenance={"generator": "test", "seed": k})
    return Episode(**(base | kw))


def tiny_dataset(root: Path) -> Path:
    """Three episodes at indices 0, 3 and 4: with reward and timestamps; a failed one with another instruction and
    neither; one without steps (a trial that never acted; LeRobot has no frames to store for it)."""
    spec = PolicySpec(task="PushCube-v1", control_mode="pd_joint_delta_pos", obs_mode="rgb",
                      cameras=tuple(CameraSpec(c, 16, 16) for c in CAMERAS), state_layout=LAYOUT, action_dim=2,
                      action_low=(-1.0, -1.0), action_high=(1.0, 1.0), control_hz=20.0,
                      instruction="push the cube to the goal")
    writer = EpisodeWriter(root, spec=spec, meta={"generator": "test"})
    writer.write(_episode(5, 0, reward=np.array([0, 0, 0, 0, 1], np.float32),
                          timestamps=np.arange(5) * 0.05 + 0.001), index=0)
    writer.write(_episode(3, 1, success=False, source="real", instruction="pick up the cube",
                          provenance={"operator": "x"}), index=3)
    writer.write(_episode(0, 2, success=False), index=4)
    return root


def _assert_same_episode(a: Episode, b: Episode) -> None:
    for name in ("state", "actions", "reward", "timestamps"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and np.array_equal(x, y), name
    assert a.images.keys() == b.images.keys()
    for cam in a.images:
        assert a.images[cam].dtype == np.uint8 and np.array_equal(a.images[cam], b.images[cam]), cam
    for name in ("instruction", "success", "control_hz", "source", "task", "control_mode", "state_layout",
                 "provenance"):
        assert getattr(a, name) == getattr(b, name), name


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != ".lock")


def _decoded(table) -> dict:
    """A parquet table's columns as Python values, PNG frames decoded (the pixels are the contract, not zlib)."""
    out = {}
    for name in table.column_names:
        values = table[name].to_pylist()
        if values and isinstance(values[0], dict) and "bytes" in values[0]:
            values = [np.asarray(Image.open(io.BytesIO(v["bytes"]))).tolist() for v in values]
        out[name] = values
    return out


def test_export_matches_the_golden_files(tmp_path):
    out = tmp_path / "lerobot"
    lerobot.export_lerobot(tiny_dataset(tmp_path / "ds"), out)
    assert _files(out) == _files(GOLDEN)
    for rel in _files(GOLDEN):
        if rel.endswith(".json"):
            assert json.loads((out / rel).read_text()) == json.loads((GOLDEN / rel).read_text()), rel
        else:
            got, want = pq.read_table(out / rel), pq.read_table(GOLDEN / rel)
            assert got.schema.equals(want.schema, check_metadata=True), rel
            assert _decoded(got) == _decoded(want), rel
    info = json.loads((out / "meta/info.json").read_text())
    assert (info["codebase_version"], info["fps"], info["total_episodes"], info["total_frames"]) == ("v3.0", 20, 2, 8)
    assert info["features"]["observation.images.wrist"] == {"dtype": "image", "shape": [16, 16, 3],
                                                            "names": ["height", "width", "channels"]}


def test_import_of_the_golden_files_is_the_dataset_exactly(tmp_path):
    """Ours -> LeRobot -> ours: states, actions, frames, instructions, boundaries, fps, indices and dataset.json."""
    src = tiny_dataset(tmp_path / "ds")
    back = tmp_path / "back"
    lerobot.import_lerobot(GOLDEN, back)
    non_empty = [p for p in list_episodes(src) if len(read_episode(p, with_images=False))]
    assert [p.name for p in list_episodes(back)] == [p.name for p in non_empty] == ["episode_000000.h5",
                                                                                    "episode_000003.h5"]
    for a, b in zip(non_empty, list_episodes(back), strict=True):
        _assert_same_episode(read_episode(a), read_episode(b))
    assert json.loads((back / "dataset.json").read_text()) == json.loads((src / "dataset.json").read_text())


def test_round_trip_through_the_cli(tmp_path):
    src = tiny_dataset(tmp_path / "ds")
    r = run_cli("sim-trainer", ["dataset", "export-lerobot", src, "--out", tmp_path / "lr"])
    assert r.returncode == 0, r.stderr
    assert "2 episodes, 8 frames at 20 fps" in r.stdout and "1 episode without steps skipped" in r.stdout
    r = run_cli("sim-trainer", ["dataset", "import-lerobot", tmp_path / "lr", "--out", tmp_path / "back"])
    assert r.returncode == 0, r.stderr
    for a, b in zip(load_dataset(src, successful_only=False)[:2], load_dataset(tmp_path / "back", False),
                    strict=True):
        _assert_same_episode(a, b)


def test_sft_on_lerobot_dir_trains_exactly_as_on_the_dataset(tmp_path):
    """`sft --data lerobot:DIR` reads the export in place: same episodes, same spec, so the same weights."""
    from safetensors.numpy import load_file

    from sim_trainer.sft.trainer import SFTConfig, train_sft

    src = tiny_dataset(tmp_path / "ds")
    lerobot.export_lerobot(src, tmp_path / "lr")
    outs = []
    for name, data in (("a", str(src)), ("b", f"lerobot:{tmp_path / 'lr'}")):
        outs.append(train_sft(SFTConfig(data=[data], out=str(tmp_path / name), size="tiny", steps=2, batch_size=4,
                                        horizon=4, exec_steps=2, num_steps=2, warmup=1, save_every=2)))
    a, b = (load_file(o / "model.safetensors") for o in outs)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert (outs[0] / "norm_stats.json").read_text() == (outs[1] / "norm_stats.json").read_text()


@pytest.mark.skipif(not WRITTEN.is_dir(), reason="no dataset written by LeRobot")
def test_import_of_a_dataset_written_by_lerobot(tmp_path):
    """LeRobot's own files (no meta/vla_episodes.json): its frames, tasks and boundaries, our defaults for the rest."""
    expected = json.loads((WRITTEN / "expected.json").read_text())
    data = lerobot.read_lerobot(WRITTEN / "dataset")
    assert [len(ep) for _, ep in data.episodes] == expected["lengths"]
    for (index, ep), want in zip(data.episodes, expected["episodes"], strict=True):
        assert index == want["episode_index"] and ep.instruction == want["task"]
        assert np.array_equal(ep.state, np.asarray(want["state"], np.float32))
        assert np.array_equal(ep.actions, np.asarray(want["action"], np.float32))
        for cam, frames in ep.images.items():
            assert np.array_equal(frames, np.asarray(want["images"][cam], np.uint8)), cam
        assert np.allclose(ep.timestamps, np.arange(len(ep)) / expected["fps"])
        assert (ep.success, ep.source, ep.control_mode, ep.control_hz) == (True, "real", "unspecified",
                                                                          expected["fps"])
    spec = data.spec
    assert sources.dataset_spec(f"lerobot:{WRITTEN / 'dataset'}") == spec  # what sft reads, without the frames
    assert spec.action_low == tuple(np.min([a for e in expected["episodes"] for a in e["action"]], axis=0).tolist())
    assert spec.state_layout == (("observation.state", len(expected["episodes"][0]["state"][0])),)
    assert [c.name for c in spec.cameras] == sorted(expected["episodes"][0]["images"])
    r = run_cli("sim-trainer", ["dataset", "import-lerobot", WRITTEN / "dataset", "--out", tmp_path / "ds"])
    assert r.returncode == 0, r.stderr
    assert len(load_dataset(tmp_path / "ds")) == len(expected["lengths"])


def _broken(tmp_path: Path, edit) -> Path:
    """A copy of the golden export with one thing wrong."""
    root = tmp_path / "broken"
    shutil.copytree(GOLDEN, root)
    edit(root)
    return root


def _edit_info(path: list[str], value) -> callable:
    def edit(root: Path) -> None:
        info = json.loads((root / "meta/info.json").read_text())
        target = info
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        (root / "meta/info.json").write_text(json.dumps(info))
    return edit


def _shorten_episode_1(root: Path) -> None:
    """meta/episodes says episode 1 has 4 frames; the data file holds 3."""
    path = root / "meta/episodes/chunk-000/file-000.parquet"
    table = pq.read_table(path)
    i = table.column_names.index("length")
    pq.write_table(table.set_column(i, "length", pa.array([5, 4], pa.int64())), path)


IMPORT_CASES = {
    "missing meta": (lambda r: shutil.rmtree(r / "meta"), "no meta/info.json"),
    "wrong codebase_version": (_edit_info(["codebase_version"], "v2.1"), "codebase_version 'v2.1'"),
    "state shape mismatch": (_edit_info(["features", "observation.state", "shape"], [5]), "shape [5]"),
    "image size mismatch": (_edit_info(["features", "observation.images.wrist", "shape"], [8, 8, 3]),
                            "meta/info.json says 8x8"),
    "video feature": (_edit_info(["features", "observation.images.wrist", "dtype"], "video"), "as video"),
    "missing data file": (lambda r: shutil.rmtree(r / "data"), "is missing"),
    "corrupt info.json": (lambda r: (r / "meta/info.json").write_text("{"), "corrupt"),
    "episode length mismatch": (_shorten_episode_1, "meta/episodes says 4 frames"),
}


@pytest.mark.parametrize("case", IMPORT_CASES)
def test_bad_lerobot_input_is_one_line(tmp_path, case):
    edit, contains = IMPORT_CASES[case]
    root = _broken(tmp_path, edit)
    assert_refused_unchanged("sim-trainer", ["dataset", "import-lerobot", root, "--out", tmp_path / "out"],
                             watched=[root], contains=contains)
    assert not (tmp_path / "out").exists()  # nothing left behind either


def test_bad_export_and_sft_input_is_one_line(tmp_path):
    src = tiny_dataset(tmp_path / "ds")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    cases = [
        (["dataset", "export-lerobot", tmp_path / "nope", "--out", tmp_path / "o1"], "does not exist"),
        (["dataset", "export-lerobot", src, "--out", src], "also this run's input"),
        (["dataset", "export-lerobot", src, "--out", tmp_path / "full"], "not empty"),
        (["dataset", "export-lerobot", src, "--out", tmp_path / "full", "--force"], "notes.txt"),
        (["sft", "--data", f"lerobot:{tmp_path / 'nope'}", "--out", tmp_path / "ck"], "does not exist"),
    ]
    for args, contains in cases:
        assert_refused_unchanged("sim-trainer", args, watched=[src, tmp_path / "full"], contains=contains)


def test_rl_cotrain_data_takes_a_lerobot_dir():
    """RL-Co's --cotrain-data names a LeRobot dataset as sft --data does (the directory is what is checked)."""
    from sim_trainer.rl.config import RLConfig

    cfg = dict(ckpt=str(FIXTURES.parents[1] / "checkpoints/pushcube_rgb_small"), out="unused")
    assert RLConfig(**cfg, cotrain_data=f"lerobot:{GOLDEN}").validate().cotrain_data == f"lerobot:{GOLDEN}"
    with pytest.raises(UserError, match="co-training dataset /nope does not exist"):
        RLConfig(**cfg, cotrain_data="lerobot:/nope").validate()
    assert [len(e) for e in sources.load_dataset(f"lerobot:{GOLDEN}")] == [5]  # its successful episodes


def test_a_fractional_control_rate_or_mixed_schemas_are_refused(tmp_path):
    writer = EpisodeWriter(tmp_path / "hz")
    writer.write(_episode(3, 0, control_hz=12.5))
    with pytest.raises(UserError, match="whole number of frames per second"):
        lerobot.export_lerobot(tmp_path / "hz", tmp_path / "o1")
    writer = EpisodeWriter(tmp_path / "mixed")
    writer.write(_episode(3, 0))
    writer.write(_episode(3, 1, state=np.zeros((3, 5), np.float32), state_layout=(("x", 5),)))
    with pytest.raises(UserError, match="state_dim is 5, the first episode's is 4"):
        lerobot.export_lerobot(tmp_path / "mixed", tmp_path / "o2")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_a_full_data_file_continues_in_the_next_file_and_chunk(tmp_path, monkeypatch):
    """Past the size limit an episode goes to the next file; past chunks_size files, to the next chunk."""
    monkeypatch.setattr(lerobot, "DATA_FILES_SIZE_IN_MB", 1e-3)  # ~1 kB: one episode per file
    monkeypatch.setattr(lerobot, "CHUNKS_SIZE", 1)
    src = tiny_dataset(tmp_path / "ds")
    out = tmp_path / "lr"
    lerobot.export_lerobot(src, out)
    assert _files(out / "data") == ["chunk-000/file-000.parquet", "chunk-001/file-000.parquet"]
    episodes = pq.read_table(out / "meta/episodes/chunk-000/file-000.parquet")
    assert episodes["data/chunk_index"].to_pylist() == [0, 1] and episodes["data/file_index"].to_pylist() == [0, 0]
    assert json.loads((out / "meta/info.json").read_text())["chunks_size"] == 1
    back = [ep for _, ep in lerobot.read_lerobot(out).episodes]
    for a, b in zip([e for e in load_dataset(src, successful_only=False) if len(e)], back, strict=True):
        _assert_same_episode(a, b)


def test_force_replaces_an_export_and_nothing_else(tmp_path):
    src = tiny_dataset(tmp_path / "ds")
    out = tmp_path / "lr"
    lerobot.export_lerobot(src, out)
    (out / "data" / "stale.parquet").write_bytes(b"old")
    lerobot.export_lerobot(src, out, force=True)
    assert _files(out) == _files(GOLDEN)


def test_statistics_are_exact(tmp_path):
    """stats.json against numpy over the frames (quantiles of images from pixel counts, numpy's linear rule)."""
    src = tiny_dataset(tmp_path / "ds")
    stats = json.loads((GOLDEN / "meta/stats.json").read_text())
    eps = [e for e in load_dataset(src, successful_only=False) if len(e)]
    state = np.concatenate([e.state for e in eps]).astype(np.float64)
    assert np.allclose(stats["observation.state"]["mean"], state.mean(0), atol=1e-12)
    assert np.allclose(stats["observation.state"]["q10"], np.quantile(state, 0.1, axis=0), atol=1e-12)
    pixels = np.concatenate([e.images["wrist"] for e in eps]).reshape(-1, 3).astype(np.float64) / 255
    for key, want in (("mean", pixels.mean(0)), ("std", pixels.std(0)), ("q01", np.quantile(pixels, 0.01, axis=0)),
                      ("q50", np.quantile(pixels, 0.5, axis=0)), ("max", pixels.max(0))):
        assert np.allclose(np.asarray(stats["observation.images.wrist"][key]).reshape(3), want, atol=1e-12), key
    assert stats["observation.images.wrist"]["count"] == [8]


if __name__ == "__main__":  # rewrite the golden export after an intended format change
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        shutil.rmtree(GOLDEN, ignore_errors=True)
        lerobot.export_lerobot(tiny_dataset(Path(tmp) / "ds"), GOLDEN)
        (GOLDEN / ".lock").unlink()
    print(f"wrote {GOLDEN}")
