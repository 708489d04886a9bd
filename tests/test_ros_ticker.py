"""The control tick's deadline scheduler: absolute deadlines on one grid, never early, overruns counted."""

from __future__ import annotations

import threading
import time

import pytest

from tests.ros_fixtures import wait_for  # noqa: F401 (puts vla_ros on the path)


def run_ticker(period: float, n: int, slow: dict[int, float]) -> tuple[list[tuple[float, float]], object]:
    """Tick `n` times; tick i sleeps slow.get(i, 0) s. Returns (deadline, start) per tick and the ticker."""
    from vla_ros.ticker import DeadlineTicker

    log: list[tuple[float, float]] = []
    done = threading.Event()

    def tick() -> None:
        log.append((ticker.deadline, time.monotonic()))
        time.sleep(slow.get(len(log) - 1, 0.0))
        if len(log) >= n:
            done.set()

    ticker = DeadlineTicker(period, tick)
    ticker.start()
    try:
        assert done.wait(60), "the ticker stopped ticking"
    finally:
        ticker.stop()
    return log[:n], ticker


def test_ticks_stay_on_the_grid_and_are_never_early():
    period = 0.02
    log, ticker = run_ticker(period, 30, {})
    t0 = log[0][0]
    for deadline, start in log:
        assert start >= deadline  # never before its deadline
        k = (deadline - t0) / period
        assert k == pytest.approx(round(k), abs=1e-6)  # absolute deadlines t0 + k * period: no drift
    ks = [round((d - t0) / period) for d, _ in log]
    assert ks == sorted(set(ks))
    assert len(ks) - 1 + ticker.skipped == ks[-1]  # every deadline either ticked or counted as skipped


def test_an_overrun_runs_late_once_skips_the_passed_periods_and_keeps_the_grid():
    period = 0.05
    log, ticker = run_ticker(period, 8, {2: 2.5 * period})
    t0 = log[0][0]
    ks = [round((d - t0) / period) for d, _ in log]
    # Tick 2 ran through deadlines 3 and 4: 3 is skipped (its period is over), 4 runs at once, late; then the grid.
    assert ks[3] - ks[2] >= 2 and ticker.overruns >= 1
    assert ticker.skipped == ks[-1] - (len(ks) - 1) >= 1
    assert all(start >= d for d, start in log)


def test_a_tick_that_raises_is_reported_and_the_loop_carries_on():
    from vla_ros.ticker import DeadlineTicker

    errors: list[Exception] = []
    calls = []

    def tick() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")

    ticker = DeadlineTicker(0.01, tick, on_error=errors.append).start()
    try:
        wait_for(lambda: len(calls) >= 3, 30, "ticks after the failing one")
    finally:
        ticker.stop()
    assert [str(e) for e in errors] == ["boom"] and not ticker.thread.is_alive()
