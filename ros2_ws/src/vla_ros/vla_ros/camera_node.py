"""Camera node for cameras without a vendor driver: OpenCV capture (V4L2 device or video file) -> Image + CameraInfo.

Frames are stamped when they are read (the closest this API gets to capture time) and published with
sensor-data QoS. A video file loops when `loop` is set, which makes a recorded scene usable as a camera.
"""

from __future__ import annotations

import threading
import time

import cv2
from rclpy.node import Node
from sensor_msgs.msg import CameraInfo, Image

from calibration.io import read_camera_yaml
from vla_ros import topics
from vla_ros.params import ParamError, declare, require, run_node_main
from vla_ros.ros_util import rgb_to_image

DEFAULTS = {
    "device": "/dev/video0",     # V4L2 device path, device index ("0"), or a video file
    "calibration": "",           # camera_info YAML; empty: no CameraInfo
    "frame_id": "camera_color_optical_frame",
    "image_topic": "/camera/camera/color/image_raw",
    "fps": 30.0,
    "width": 0,
    "height": 0,
    "loop": False,
}


class CameraNode(Node):
    def __init__(self, name: str = "camera", **node_kwargs):
        super().__init__(name, **node_kwargs)
        p = declare(self, DEFAULTS)
        require(p["fps"] > 0, "fps must be > 0")
        self.p = p
        self.cal = None
        if p["calibration"]:
            self.cal = read_camera_yaml(p["calibration"])  # a bad file is one UserError line (CONFIG_ERRORS)
        dev = p["device"]
        self.cap = cv2.VideoCapture(int(dev) if dev.isdigit() else dev)
        if not self.cap.isOpened():
            raise ParamError(f"cannot open camera or video {dev!r}")
        if p["width"] and p["height"]:
            self.cap.set(cv2.CAP_PROP_FRAME_WIDTH, p["width"])
            self.cap.set(cv2.CAP_PROP_FRAME_HEIGHT, p["height"])
        base = p["image_topic"].rsplit("/", 1)[0]
        self.image_pub = self.create_publisher(Image, p["image_topic"], topics.SENSOR_QOS)
        self.info_pub = self.create_publisher(CameraInfo, f"{base}/camera_info", topics.SENSOR_QOS)
        self.frames = 0
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="camera_capture", daemon=True)
        self.thread.start()

    def _info(self, stamp, h: int, w: int) -> CameraInfo:
        info = CameraInfo()
        info.header.stamp, info.header.frame_id = stamp, self.p["frame_id"]
        info.height, info.width = h, w
        if self.cal is not None:
            if (self.cal.width, self.cal.height) != (w, h):
                self.get_logger().error(f"calibration is for {self.cal.width}x{self.cal.height}, frames are {w}x{h}",
                                        throttle_duration_sec=10.0)
            info.k = self.cal.K.reshape(-1).tolist()
            info.d = self.cal.dist.tolist()
            info.r = self.cal.R.reshape(-1).tolist()
            info.p = self.cal.P.reshape(-1).tolist()
            info.distortion_model = self.cal.distortion_model
        return info

    def _loop(self) -> None:
        period = 1.0 / self.p["fps"]
        next_t = time.monotonic()
        while self.running:
            ok, bgr = self.cap.read()
            if not ok:
                if self.p["loop"] and self.frames:
                    self.cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                    continue
                self.get_logger().error("camera stream ended or failed", throttle_duration_sec=5.0)
                time.sleep(0.5)
                continue
            stamp = self.get_clock().now().to_msg()
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            self.image_pub.publish(rgb_to_image(rgb, stamp, self.p["frame_id"]))
            self.info_pub.publish(self._info(stamp, rgb.shape[0], rgb.shape[1]))
            self.frames += 1
            next_t += period
            time.sleep(max(0.0, next_t - time.monotonic()))
            next_t = max(next_t, time.monotonic() - period)

    def close(self) -> None:
        self.running = False
        self.thread.join(timeout=2.0)
        self.cap.release()


def main(args: list[str] | None = None) -> int:
    return run_node_main(CameraNode, args)
