"""Bounded pending queue with batch collection: the server's only buffer between sockets and the model.

Bounded so a flood costs memory proportional to `capacity`, never to the flood: when it is full the server
answers `overloaded` at once instead of queueing. The wait for more requests is measured from the oldest
queued item, so requests that already waited during the previous inference are not delayed further.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class BatchQueue(Generic[T]):
    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._items: deque[tuple[float, T]] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def offer(self, item: T) -> bool:
        """Enqueue unless full or closed; never blocks."""
        with self._cond:
            if self._closed or len(self._items) >= self.capacity:
                return False
            self._items.append((time.monotonic(), item))
            self._cond.notify()
            return True

    def take(self, max_batch: int, max_wait_s: float, expected: Callable[[], int] | None = None) -> list[T] | None:
        """Block for the first item, then gather up to max_batch until max_wait_s after it arrived; None once closed.

        `expected()` is how many requests could come at all (e.g. the number of active clients): once that many
        are queued, waiting longer only adds latency, so a lone client is never delayed by batching.
        """
        with self._cond:
            while not self._items and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            deadline = self._items[0][0] + max_wait_s
            while not self._closed and len(self._items) < min(max_batch, expected() if expected else max_batch):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            n = min(max_batch, len(self._items))
            return [self._items.popleft()[1] for _ in range(n)]

    def close(self) -> list[T]:
        """Stop accepting, wake the taker, and hand back whatever was still pending."""
        with self._cond:
            self._closed = True
            left = [item for _, item in self._items]
            self._items.clear()
            self._cond.notify_all()
            return left
