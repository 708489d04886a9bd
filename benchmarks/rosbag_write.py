#!/usr/bin/env python
"""The eval manager's bag recorder (vla_ros.bag_recorder) writing camera frames: can it keep up with a camera?

Feeds BagRecorder.add() raw CDR sensor_msgs/Image frames (random rgb8, as a ROS callback hands them over) as
fast as it takes them, then closes the bag and waits for the writer thread's report. Prints the time add() takes
on the caller's thread (what a ROS callback pays) and the writer's throughput, in MB/s and frames/s, next to
the rate a camera of that size produces at --fps. The bag goes to a temporary directory on --dir's disk.

    python benchmarks/rosbag_write.py                      # 300 frames 640x480 (about 280 MB on disk)
    python benchmarks/rosbag_write.py --frames 30          # smoke size
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "ros2_ws" / "src" / "vla_ros")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--fps", type=float, default=30.0, help="the camera rate to compare with")
    ap.add_argument("--dir", default=None, help="where the temporary bag goes (default: the system temp dir)")
    a = ap.parse_args()

    from rosbags.typesys import Stores, get_typestore
    from vla_ros.bag_recorder import BagRecorder

    ts = get_typestore(Stores.ROS2_KILTED)
    t = ts.types
    header = t["std_msgs/msg/Header"](stamp=t["builtin_interfaces/msg/Time"](sec=0, nanosec=0), frame_id="camera")
    pixels = np.random.default_rng(0).integers(0, 255, a.width * a.height * 3, dtype=np.uint8)
    frame = bytes(ts.serialize_cdr(t["sensor_msgs/msg/Image"](
        header=header, height=a.height, width=a.width, encoding="rgb8", is_bigendian=0, step=3 * a.width,
        data=pixels), "sensor_msgs/msg/Image"))
    reports, done = [], threading.Event()
    rec = BagRecorder(print, lambda r: (reports.append(r), done.set()), max_queue_bytes=1 << 40)
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        t0 = time.perf_counter()
        rec.open(Path(tmp) / "bag", {"trial": 0})
        adds = []
        for k in range(a.frames):
            s = time.perf_counter()
            rec.add("/camera/camera/color/image_raw", "sensor_msgs/msg/Image", 10**9 + k * 10**9 // 30, frame)
            adds.append(time.perf_counter() - s)
        rec.close()
        done.wait()
        wall = time.perf_counter() - t0
        rec.shutdown()
    r = reports[0]
    mb = len(frame) / 1e6
    print(f"{a.frames} frames {a.width}x{a.height} rgb8 ({mb:.2f} MB each): written in {wall:.2f} s = "
          f"{a.frames * mb / wall:.0f} MB/s, {a.frames / wall:.0f} frames/s (a {a.fps:g} fps camera: "
          f"{a.fps * mb:.0f} MB/s); add() p50 {1e6 * np.median(adds):.1f} us, max {1e6 * max(adds):.1f} us; "
          f"messages {r['messages']}, dropped {r['dropped']}, error {r['error']}")
    return 0 if r["error"] is None and r["dropped"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
