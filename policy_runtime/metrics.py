"""Server counters and latency statistics, exposed through `ping` so a robot (or an operator) sees health live."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque

import numpy as np

BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)  # upper edges; the last bucket is "+inf"


class Metrics:
    """Thread-safe: the I/O thread counts requests and errors, the worker thread counts chunks and latencies."""

    def __init__(self, window: int = 2048):
        self._lock = threading.Lock()
        self.t_start = time.monotonic()
        self.received = 0
        self.served = 0
        self.batches = 0
        self.errors: Counter[str] = Counter()
        self.batch_sizes: Counter[int] = Counter()
        self._latency: deque[float] = deque(maxlen=window)
        self._hist = [0] * (len(BUCKETS_MS) + 1)

    def request(self) -> None:
        with self._lock:
            self.received += 1

    def error(self, code: str) -> None:
        with self._lock:
            self.errors[code] += 1

    def batch(self, size: int) -> None:
        with self._lock:
            self.batches += 1
            self.batch_sizes[size] += 1

    def served_one(self, latency_ms: float) -> None:
        """A chunk went out; latency is server receive -> send."""
        with self._lock:
            self.served += 1
            self._latency.append(latency_ms)
            i = next((k for k, edge in enumerate(BUCKETS_MS) if latency_ms <= edge), len(BUCKETS_MS))
            self._hist[i] += 1

    def health(self, queue_depth: int = 0) -> dict:
        with self._lock:
            lat = np.asarray(self._latency, np.float64)
            pct = ({f"p{q}": round(float(np.percentile(lat, q)), 3) for q in (50, 90, 99)} |
                   {"max": round(float(lat.max()), 3), "window": int(lat.size)}) if lat.size else {"window": 0}
            return {
                "uptime_s": round(time.monotonic() - self.t_start, 3),
                "requests": self.received, "served": self.served, "batches": self.batches,
                "errors": sum(self.errors.values()), "errors_by_code": dict(self.errors),
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "queue_depth": queue_depth, "latency_ms": pct,
                "latency_hist_ms": {"le": [*BUCKETS_MS, "inf"], "counts": list(self._hist)},
            }
