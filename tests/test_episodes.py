"""The episode dataset format and normalisation statistics."""

from __future__ import annotations

import numpy as np
import pytest

from policy_runtime.episodes import Episode, EpisodeWriter, dataset_spec, list_episodes, load_dataset, read_episode
from sim_trainer.data.normalize import NormStats
from sim_trainer.errors import UserError


def make_episode(t: int = 6, success: bool = True) -> Episode:
    rng = np.random.default_rng(t)
    return Episode(
        state=rng.normal(size=(t, 5)).astype(np.float32),
        actions=rng.uniform(-1, 1, size=(t, 3)).astype(np.float32),
        images={"cam": rng.integers(0, 255, size=(t, 8, 8, 3), dtype=np.uint8)},
        instruction="pick up the cube",
        success=success,
        control_hz=20.0,
        source="real",
        task="PickCube-v1",
        control_mode="pd_joint_delta_pos",
        state_layout=(("agent/qpos", 3), ("extra/goal", 2)),
        provenance={"operator": "test"},
        reward=np.zeros(t, np.float32),
        timestamps=np.arange(t) / 20.0,
    )


def test_round_trip(tmp_path):
    ep = make_episode()
    writer = EpisodeWriter(tmp_path / "ds", meta={"note": "x"})
    path = writer.write(ep)
    back = read_episode(path)
    for name in ("state", "actions", "reward", "timestamps"):
        np.testing.assert_array_equal(getattr(back, name), getattr(ep, name))
    np.testing.assert_array_equal(back.images["cam"], ep.images["cam"])
    assert (back.instruction, back.success, back.source, back.state_layout, back.provenance) == (
        ep.instruction, True, "real", ep.state_layout, {"operator": "test"})
    assert not list((tmp_path / "ds" / "episodes").glob("*.tmp"))
    writer.write(make_episode(4, success=False))
    assert len(list_episodes(tmp_path / "ds")) == 2
    assert len(load_dataset(tmp_path / "ds")) == 1  # failed episodes are not training data


def test_a_trial_that_never_acted_keeps_its_zero_step_record(tmp_path):
    """A trial aborted before the first action is still recorded (it used to fail in h5py and leave a .tmp)."""
    writer = EpisodeWriter(tmp_path / "ds")
    back = read_episode(writer.write(make_episode(0, success=False)))
    assert len(back) == 0 and back.images["cam"].shape == (0, 8, 8, 3)
    assert not list((tmp_path / "ds" / "episodes").glob("*.tmp"))
    assert len(list_episodes(tmp_path / "ds")) == 1


def test_never_overwrites(tmp_path):
    writer = EpisodeWriter(tmp_path / "ds")
    writer.write(make_episode(), index=0)
    with pytest.raises(UserError, match="never overwritten"):
        writer.write(make_episode(), index=0)


def test_inconsistent_episode_rejected(tmp_path):
    ep = make_episode()
    ep.images["cam"] = ep.images["cam"][:-1]
    with pytest.raises(UserError, match="frames"):
        EpisodeWriter(tmp_path / "ds").write(ep)


def test_missing_and_corrupt_datasets(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        list_episodes(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not an episode dataset"):
        list_episodes(tmp_path / "empty")
    writer = EpisodeWriter(tmp_path / "ds")
    path = writer.write(make_episode())
    path.write_bytes(b"garbage" * 10)
    with pytest.raises(UserError, match="corrupt episode file"):
        read_episode(path)
    with pytest.raises(UserError, match="no policy spec"):
        dataset_spec(tmp_path / "ds")


def test_norm_stats(tmp_path):
    eps = [make_episode(50), make_episode(30)]
    stats = NormStats.from_episodes(eps)
    all_actions = np.concatenate([e.actions for e in eps])
    np.testing.assert_allclose(stats.actions.mean, all_actions.mean(0), atol=1e-6)
    np.testing.assert_allclose(stats.actions.q99, np.quantile(all_actions, 0.99, axis=0), atol=1e-6)
    stats.save(tmp_path / "n.json")
    back = NormStats.load(tmp_path / "n.json")
    np.testing.assert_allclose(back.state.std, stats.state.std)


def test_appending_with_another_spec_is_refused(tmp_path, state_demos):
    from dataclasses import replace

    spec = dataset_spec(state_demos)
    EpisodeWriter(tmp_path / "ds", spec=spec)
    EpisodeWriter(tmp_path / "ds", spec=replace(spec, instruction="say it differently"))  # same contract
    with pytest.raises(UserError, match="another spec"):
        EpisodeWriter(tmp_path / "ds", spec=replace(spec, control_hz=10.0))


def test_mixed_sampler_honours_ratios_and_keeps_each_instruction():
    from sim_trainer.models.tokenizer import tokenize, tokenize_batch
    from sim_trainer.sft.data import ChunkSource, MixedSampler

    a, b = make_episode(40), make_episode(40)
    b.instruction = "a different task"
    sources = [ChunkSource([e], 4, lambda t: tokenize_batch(t, 48)) for e in (a, b)]
    batch = MixedSampler(sources, [0.8, 0.2], seed=0).sample(4000)
    frac = (batch.source == 0).float().mean().item()
    assert abs(frac - 0.8) < 0.03
    assert (batch.text[batch.source == 1] == tokenize("a different task", 48)).all()
    assert (batch.text[batch.source == 0] == tokenize(a.instruction, 48)).all()
    # chunks never run into the next episode: padded steps are marked invalid
    assert not batch.valid[:, 1:].all()
