"""Bounded, per-client fair pending queue with batch collection: the server's only buffer between sockets and model.

Bounded so a flood costs memory proportional to `capacity`, never to the flood: when it is full the server
answers `overloaded` at once instead of queueing. Each client (key: its ZeroMQ identity) holds at most
`per_key` pending items, and when the queue is full a client holding fewer than the largest holder displaces
that holder's newest item, so one client sending as fast as it can never takes the queue from the others.
Batches are filled round-robin across clients (one item per client per round, clients in rotation), so a
50 Hz robot waits at most one item of each other client, not the flood. The wait for more requests is
measured from the oldest queued item, so requests that already waited during the previous inference are not
delayed further.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class BatchQueue(Generic[T]):
    def __init__(self, capacity: int, per_key: int | None = None):
        if capacity < 1 or (per_key is not None and per_key < 1):
            raise ValueError("capacity and per_key must be at least 1")
        self.capacity = capacity
        self.per_key = capacity if per_key is None else min(per_key, capacity)
        self._queues: OrderedDict[Hashable, deque[tuple[float, T]]] = OrderedDict()  # rotation order
        self._size = 0
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return self._size

    def pending(self, key: Hashable) -> int:
        with self._cond:
            return len(self._queues.get(key, ()))

    def _victim(self, key: Hashable) -> Hashable | None:
        """When full: the client holding the most items, if it holds more than `key` would after admission."""
        mine = len(self._queues.get(key, ()))
        biggest = max(self._queues, key=lambda k: len(self._queues[k]))
        return biggest if len(self._queues[biggest]) > mine + 1 else None

    def admits(self, key: Hashable) -> bool:
        """Would offer(key, ...) accept now? Cheap: the server asks this before decoding a request."""
        with self._cond:
            if self._closed or len(self._queues.get(key, ())) >= self.per_key:
                return False
            return self._size < self.capacity or self._victim(key) is not None

    def offer(self, key: Hashable, item: T) -> tuple[bool, T | None]:
        """(accepted, displaced item or None); never blocks. A displaced item must be answered by the caller."""
        with self._cond:
            if self._closed or len(self._queues.get(key, ())) >= self.per_key:
                return False, None
            displaced = None
            if self._size >= self.capacity:
                victim = self._victim(key)
                if victim is None:
                    return False, None
                displaced = self._queues[victim].pop()[1]
                self._size -= 1
            self._queues.setdefault(key, deque()).append((time.monotonic(), item))
            self._size += 1
            self._cond.notify()
            return True, displaced

    def take(self, max_batch: int, max_wait_s: float, expected: Callable[[], int] | None = None) -> list[T] | None:
        """Block for the first item, then gather up to max_batch until max_wait_s after it arrived; None once closed.

        `expected()` is how many requests could come at all (e.g. the number of active clients): once that many
        are queued, waiting longer only adds latency, so a lone client is never delayed by batching.
        """
        with self._cond:
            while not self._size and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            deadline = min(q[0][0] for q in self._queues.values() if q) + max_wait_s
            while not self._closed and self._size < min(max_batch, expected() if expected else max_batch):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return self._round_robin(max_batch)

    def _round_robin(self, max_batch: int) -> list[T]:
        """One item per client per round, rotating so the next batch starts with the client served least recently."""
        out: list[T] = []
        while len(out) < max_batch and self._size:
            key, q = next(iter(self._queues.items()))
            out.append(q.popleft()[1])
            self._size -= 1
            del self._queues[key]
            if q:
                self._queues[key] = q  # back of the rotation
        for key in [k for k, q in self._queues.items() if not q]:
            del self._queues[key]
        return out

    def close(self) -> list[T]:
        """Stop accepting, wake the taker, and hand back whatever was still pending."""
        with self._cond:
            self._closed = True
            left = [item for q in self._queues.values() for _, item in q]
            self._queues.clear()
            self._size = 0
            self._cond.notify_all()
            return left
