"""Hand-eye calibration capture: on a key press (c) or `~/capture`, save the image and the joint state.

Writes into `out_dir`: img_NNN.png and samples.json, the input of `calibrate handeye`:
{"board": {...}, "intrinsics": "camera.yaml", "samples": [{"image": "img_000.png",
"joint_positions": {"panda_joint1": ...}, "stamp": ...}]}. samples.json is rewritten atomically after
each capture, so an interrupted session keeps every sample taken so far.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import cv2
from rclpy.node import Node
from sensor_msgs.msg import Image, JointState
from std_srvs.srv import Trigger

from policy_runtime.contract import PANDA_ARM_JOINTS
from policy_runtime.yaml_io import load_yaml_mapping
from vla_ros import console, topics
from vla_ros.params import declare, run_node_main
from vla_ros.ros_util import JointStateCache, image_to_rgb, stamp_s

DEFAULTS = {
    "out_dir": "handeye_capture",
    "image_topic": "/camera/camera/color/image_raw",
    "joints": list(PANDA_ARM_JOINTS),
    "board": "",                  # YAML/JSON file describing the calibration board (copied into samples.json)
    "intrinsics": "camera.yaml",  # camera_info YAML, relative to out_dir
    "max_skew_s": 0.05,
    "console": True,
}


class CaptureNode(Node):
    def __init__(self, name: str = "calibration_capture", **node_kwargs):
        super().__init__(name, **node_kwargs)
        p = declare(self, DEFAULTS)
        self.p = p
        self.out = Path(p["out_dir"])
        self.out.mkdir(parents=True, exist_ok=True)
        board = {}
        if p["board"]:
            board = load_yaml_mapping(p["board"], "board description")
        path = self.out / "samples.json"
        self.doc = json.loads(path.read_text()) if path.exists() else {"board": board, "intrinsics": p["intrinsics"],
                                                                        "samples": []}
        if board:
            self.doc["board"] = board
        self.lock = threading.Lock()
        self.frame: Image | None = None
        self.joints = JointStateCache()
        self.create_subscription(Image, p["image_topic"], self._on_image, topics.SENSOR_QOS)
        self.create_subscription(JointState, topics.JOINT_STATES, self.joints.update, topics.SENSOR_QOS)
        self.create_service(Trigger, "~/capture", self._srv)
        if p["console"] and console.register("c", lambda _k: self._report(self.capture())):
            print("calibration capture: press c to save a sample", flush=True)

    def _on_image(self, msg: Image) -> None:
        with self.lock:
            self.frame = msg

    def _srv(self, _req, resp):
        resp.success, resp.message = self.capture()
        return resp

    def _report(self, result: tuple[bool, str]) -> None:
        (self.get_logger().info if result[0] else self.get_logger().error)(result[1])

    def capture(self) -> tuple[bool, str]:
        with self.lock:
            frame = self.frame
        snap = self.joints.get()
        if frame is None or snap is None:
            return False, "no image or joint state received yet"
        missing = [j for j in self.p["joints"] if j not in snap.positions]
        if missing:
            return False, f"joint_states lacks {', '.join(missing)}"
        skew = abs(stamp_s(frame.header.stamp) - snap.stamp)
        if skew > self.p["max_skew_s"]:
            return False, f"image and joint state are {skew:.3f} s apart; hold the arm still and retry"
        n = len(self.doc["samples"])
        name = f"img_{n:03d}.png"
        cv2.imwrite(str(self.out / name), cv2.cvtColor(image_to_rgb(frame), cv2.COLOR_RGB2BGR))
        self.doc["samples"].append({"image": name, "joint_positions": {j: snap.positions[j] for j in self.p["joints"]},
                                    "stamp": stamp_s(frame.header.stamp)})
        tmp = self.out / ".samples.json.tmp"
        tmp.write_text(json.dumps(self.doc, indent=2))
        os.replace(tmp, self.out / "samples.json")
        return True, f"saved sample {n} ({name})"

    def close(self) -> None:
        console.close()


def main(args: list[str] | None = None) -> int:
    return run_node_main(CaptureNode, args)
