#!/usr/bin/env python
"""Wake-up jitter of a 20 Hz deadline loop in a bare Python process: what the host and the GIL cost a control tick.

    python benchmarks/tick_wakeup.py [--fifo PRIO] [--busy]

160 ticks at absolute deadlines t0 + k * 50 ms; prints p50/p99/max of |period - 50 ms|. `--fifo` puts the loop's
thread under SCHED_FIFO at PRIO (root or CAP_SYS_NICE); `--busy` adds one pure-Python thread that keeps asking
for the GIL, as an rclpy executor's callbacks in the same process do.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fifo", type=int, default=0)
    ap.add_argument("--busy", action="store_true")
    a = ap.parse_args()
    stop = threading.Event()

    def busy() -> None:
        x = 0
        while not stop.is_set():
            x += 1

    if a.busy:
        threading.Thread(target=busy, daemon=True).start()
    starts: list[float] = []

    def loop() -> None:
        if a.fifo:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(a.fifo))
        t0 = time.monotonic()
        for k in range(1, 161):
            deadline = t0 + k * 0.05
            while (left := deadline - time.monotonic()) > 0:
                time.sleep(left)
            starts.append(time.monotonic())

    t = threading.Thread(target=loop)
    t.start()
    t.join()
    stop.set()
    jitter = np.abs(np.diff(starts) * 1e3 - 50.0)
    print(f"fifo {a.fifo} busy {a.busy}: jitter p50 {np.percentile(jitter, 50):.2f} p99 "
          f"{np.percentile(jitter, 99):.2f} max {jitter.max():.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
