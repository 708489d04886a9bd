"""Small rclpy helpers shared by the nodes: joint-state cache (by name), diagnostics, time, images."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from sensor_msgs.msg import Image, JointState

LEVELS = {"ok": DiagnosticStatus.OK, "warn": DiagnosticStatus.WARN, "error": DiagnosticStatus.ERROR}


def stamp_s(stamp) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


@dataclass
class JointSnapshot:
    positions: dict[str, float]
    velocities: dict[str, float]
    stamp: float  # seconds, node clock of the publisher


@dataclass
class JointStateCache:
    """Latest joint state merged by joint name (several publishers may cover different joints)."""

    _snap: JointSnapshot | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def update(self, msg: JointState) -> None:
        with self._lock:
            pos = dict(self._snap.positions) if self._snap else {}
            vel = dict(self._snap.velocities) if self._snap else {}
            for i, name in enumerate(msg.name):
                if i < len(msg.position):
                    pos[name] = float(msg.position[i])
                if i < len(msg.velocity):
                    vel[name] = float(msg.velocity[i])
            self._snap = JointSnapshot(pos, vel, stamp_s(msg.header.stamp))

    def get(self) -> JointSnapshot | None:
        with self._lock:
            return self._snap


def diagnostic(node_name: str, level: str, message: str, values: dict, stamp) -> DiagnosticArray:
    arr = DiagnosticArray()
    arr.header.stamp = stamp
    arr.status = [DiagnosticStatus(level=LEVELS[level], name=f"vla/{node_name}", message=message,
                                   hardware_id="vla_ros",
                                   values=[KeyValue(key=str(k), value=str(v)) for k, v in values.items()])]
    return arr


def image_to_rgb(msg: Image) -> np.ndarray:
    """sensor_msgs/Image (rgb8, bgr8, rgba8, bgra8) -> HxWx3 uint8 RGB, without cv_bridge."""
    channels = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4}
    if msg.encoding not in channels:
        raise ValueError(f"unsupported image encoding {msg.encoding!r} (rgb8, bgr8, rgba8, bgra8)")
    c = channels[msg.encoding]
    a = np.frombuffer(bytes(msg.data), dtype=np.uint8).reshape(msg.height, msg.step)[:, :msg.width * c]
    a = a.reshape(msg.height, msg.width, c)[:, :, :3]
    return a[:, :, ::-1].copy() if msg.encoding.startswith("bgr") else a.copy()


def rgb_to_image(rgb: np.ndarray, stamp, frame_id: str) -> Image:
    msg = Image()
    msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.height, msg.width = int(rgb.shape[0]), int(rgb.shape[1])
    msg.encoding = "rgb8"
    msg.step = msg.width * 3
    msg.data = np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()
    return msg
