"""Chunk executors (numpy, virtual time) and guided real-time chunking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from policy_runtime.chunking import (
    AsyncExecutor,
    DelayEstimator,
    SyncExecutor,
    TemporalEnsembleExecutor,
    make_executor,
)
from sim_trainer.models.rtc import guidance_scale, guided_denoise, prefix_weights

H, A = 8, 2


def chunk_from(step: int) -> np.ndarray:
    """A chunk whose action for step t is [t, step] (so the test can see which chunk served which step)."""
    return np.stack([np.array([step + i, step], float) for i in range(H)])


def drive(executor, steps: int, delay: int):
    """Virtual-time loop: returns (action or None) per step and the steps at which requests were made."""
    in_flight, out, asked = [], [], []
    for t in range(steps):
        for _, req in [f for f in in_flight if f[0] <= t]:
            executor.on_chunk(chunk_from(req.obs_step), req, t)
        in_flight = [f for f in in_flight if f[0] > t]
        req = executor.request(t)
        if req is not None:
            asked.append(t)
            if delay == 0:
                executor.on_chunk(chunk_from(t), req, t)
            else:
                in_flight.append((t + delay, req))
        out.append(executor.action(t))
    return out, asked


def test_sync_holds_while_waiting_and_executes_c_actions():
    out, asked = drive(SyncExecutor(exec_steps=4), 16, delay=2)
    assert asked == [0, 6, 12]
    assert [a is None for a in out[:2]] == [True, True]
    # chunk from step 0 arrives at 2 and starts there: its own first 4 actions, then hold again
    assert [a[0] for a in out[2:6]] == [0, 1, 2, 3] and out[6] is None


def test_async_never_holds_when_latency_is_below_the_chunk_and_skips_elapsed_steps():
    ex = AsyncExecutor(H, exec_steps=4, merge="switch", delay=DelayEstimator(20, initial_s=0.1))
    out, asked = drive(ex, 20, delay=2)
    assert asked == [0, 4, 8, 12, 16]
    assert all(a is not None for a in out[2:])
    # every executed action is the one planned for that very step (t, from the newest chunk available)
    for t in range(2, 20):
        assert out[t][0] == t and out[t][1] == max(s for s in asked if s + 2 <= t)


def test_async_crossfade_blends_old_into_new():
    ex = AsyncExecutor(H, exec_steps=4, merge="crossfade", blend_steps=3)
    ex.on_chunk(np.zeros((H, A)), ex.request(0), 0)
    ex.on_chunk(np.ones((H, A)), ex.request(4), 5)
    blended = [ex.action(t)[0] for t in range(5, 9)]
    assert blended == pytest.approx([0.25, 0.5, 0.75, 1.0])


def _req(step: int):
    from policy_runtime.chunking import ChunkRequest

    return ChunkRequest(step)


def test_async_rtc_request_carries_the_leftover_and_delay():
    ex = AsyncExecutor(H, exec_steps=4, merge="rtc", delay=DelayEstimator(20, initial_s=0.12))
    first = ex.request(0)
    assert first.leftover is None and first.delay_steps == 3
    ex.on_chunk(chunk_from(0), first, 0)
    req = ex.request(4)
    assert req.delay_steps == 3
    np.testing.assert_array_equal(req.leftover[:4, 0], [4, 5, 6, 7])
    assert (req.leftover[4:] == 0).all()


def test_temporal_ensemble_weights_older_predictions_more():
    ex = TemporalEnsembleExecutor(H, query_every=1, m=np.log(2))
    ex.on_chunk(np.zeros((H, A)), _req(0), 0)
    ex.on_chunk(np.ones((H, A)), _req(1), 1)
    assert ex.action(1)[0] == pytest.approx(1 / 3)  # weights 1 (old) and 1/2 (new)
    assert ex.action(0)[0] == 0.0


def test_delay_estimator_uses_p95_of_round_trips():
    d = DelayEstimator(20)
    for lat in [0.01] * 95 + [0.2] * 5:
        d.add(lat)
    assert d.steps() in (1, 2, 3, 4)
    assert DelayEstimator(20, initial_s=0.3).steps() == 6
    with pytest.raises(ValueError):
        make_executor("teleport", H, 4, 20.0)


def test_rtc_weights_and_schedule():
    w = prefix_weights(16, delay=3, exec_steps=8)
    assert (w[:3] == 1).all() and (w[8:] == 0).all() and (np.diff(w[3:8].numpy()) < 0).all()
    assert guidance_scale(1.0, 5.0) == 5.0 and guidance_scale(0.0, 5.0) == 0.0


def test_guided_denoising_makes_the_frozen_prefix_follow_the_leftover():
    from tests.test_model import make_inputs, make_model

    model = make_model().eval()
    images, state, text = make_inputs()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4, 8, 3, generator=g)
    leftover = torch.full((4, 8, 3), 0.7)
    w = prefix_weights(8, delay=3, exec_steps=4)
    with torch.no_grad():
        cache = model.encode_prefix(images, state, text)
        free = model.denoise(cache, noise, 4)
    guided = guided_denoise(model, cache, noise, 4, leftover, w, max_weight=5.0)
    err_free = (free[:, :3] - leftover[:, :3]).abs().mean()
    err_guided = (guided[:, :3] - leftover[:, :3]).abs().mean()
    assert err_guided < 0.5 * err_free
    assert torch.isfinite(guided).all()
