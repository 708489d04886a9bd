"""A control loop on its own thread with a deadline scheduler: ticks at t0 + k * period, no drift.

An rclpy timer runs on the executor, behind whatever camera, joint-state or diagnostics callback holds the
thread or the node's callback group, and the next tick is scheduled from when the previous one ran. Here the
tick owns a thread: it sleeps until the next absolute deadline of the grid t0 + k * period. A tick that ends
after the next deadline is an overrun (counted): the next tick runs at once, late, and a deadline whose whole
period has passed meanwhile is skipped (counted too), never run in a burst of stale commands; the grid does
not move.

On the wall clock the deadlines are on the monotonic clock (a system-time step never stretches a period).
With a ROS clock in sim time (`/clock`) they are on that clock, and the thread wakes on each clock jump;
a clock that jumps back (the simulator restarted) starts a new grid.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

_SIM_POLL_S = 0.05  # wall-time bound on one wait for a /clock jump (stop requests are seen within this)


class DeadlineTicker:
    """Calls `tick()` at t0 + k * period on a thread of its own; `on_overrun(skipped, late_s)` after an overrun.

    `clock`: an rclpy Clock with sim time active, to tick on the ROS clock; None: the monotonic wall clock.
    `on_error(exc)` is called when a tick raises (the loop carries on); without it the exception ends the loop.
    """

    def __init__(self, period_s: float, tick: Callable[[], None], *, clock=None, name: str = "control_tick",
                 on_overrun: Callable[[int, float], None] | None = None,
                 on_error: Callable[[Exception], None] | None = None):
        if not period_s > 0:
            raise ValueError(f"period must be > 0, got {period_s}")
        self.period, self.tick, self.clock = float(period_s), tick, clock
        self.on_overrun, self.on_error = on_overrun, on_error
        self.overruns = 0  # ticks that ended after the next deadline (the next tick started late)
        self.skipped = 0  # deadlines dropped because their whole period passed before a tick could start
        self.ticks = 0
        self.deadline: float | None = None  # of the tick running now (or the last one)
        self._stop = threading.Event()
        self._jumped = threading.Event()
        self._jump_handle = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> DeadlineTicker:
        if self.clock is not None:
            from rclpy.clock import JumpThreshold
            from rclpy.duration import Duration

            threshold = JumpThreshold(min_forward=Duration(nanoseconds=1), min_backward=Duration(nanoseconds=-1),
                                      on_clock_change=True)
            self._jump_handle = self.clock.create_jump_callback(threshold, post_callback=lambda _j: self._jumped.set())
        self.thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._jumped.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout)
        if self._jump_handle is not None:
            self._jump_handle.unregister()
            self._jump_handle = None

    @property
    def running(self) -> bool:
        return self.thread.is_alive() and not self._stop.is_set()

    def now(self) -> float:
        return self.clock.now().nanoseconds * 1e-9 if self.clock is not None else time.monotonic()

    def _run(self) -> None:
        t0, k = self.now(), 0
        while not self._stop.is_set():
            deadline = t0 + k * self.period
            if not self._sleep_until(deadline):
                if self._stop.is_set():
                    return
                t0, k = self.now(), 0  # the clock went back: a new grid from now
                continue
            self.deadline = deadline
            try:
                self.tick()
            except Exception as e:
                if self.on_error is None:
                    raise
                self.on_error(e)
            self.ticks += 1
            k += 1
            late = self.now() - (t0 + k * self.period)
            if late > 0:  # the next deadline has passed: run it now unless its period is over too, keep the grid
                skipped = int(late // self.period)
                k += skipped
                self.overruns += 1
                self.skipped += skipped
                if self.on_overrun is not None:
                    self.on_overrun(skipped, late)

    def _sleep_until(self, deadline: float) -> bool:
        """True at the deadline; False when stopped or when the clock went back past the previous deadline."""
        while not self._stop.is_set():
            now = self.now()
            if now >= deadline:
                return True
            if now < deadline - 2 * self.period:
                return False
            if self.clock is None:
                self._stop.wait(deadline - now)
            else:
                self._jumped.wait(_SIM_POLL_S)
                self._jumped.clear()
        return False
