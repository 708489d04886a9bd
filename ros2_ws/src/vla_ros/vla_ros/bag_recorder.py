"""Each trial as a rosbag2 directory (MCAP storage), written with `rosbags` on a thread of its own.

ROS callbacks only hand over the message bytes as DDS delivered them (raw CDR, what `ros2 bag record` stores)
with the receive time on the node's clock; the writer thread opens, fills and closes the bags. The queue is
bounded in bytes: when the disk cannot keep up, messages are dropped and counted, never waited for, so
recording can never slow down the eval manager or the control path. A bag that cannot be written (no space,
an unwritable directory) is reported and given up; the trial itself goes on. Every bag ends with a report
(path, messages, dropped, error) handed to `on_closed`.

Topics are subscribed once they appear in the ROS graph, with the type the graph gives (as `ros2 bag record`
does); the eval manager adds its own trial events (`EVENTS_TOPIC`, std_msgs/String JSON) and the policy's
contract (`/vla/policy/spec`) to each bag directly.
"""

from __future__ import annotations

import contextlib
import importlib
import queue
import threading
from collections.abc import Callable
from pathlib import Path

from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

EVENTS_TOPIC = "/vla/eval/events"  # std_msgs/String: the eval manager's journal events of the trial (JSON)
STRING = "std_msgs/msg/String"
TYPESTORE = get_typestore(Stores.ROS2_KILTED)


def string_cdr(text: str) -> bytes:
    """std_msgs/String as CDR bytes, exactly as a ROS 2 publisher would send it."""
    return bytes(TYPESTORE.serialize_cdr(TYPESTORE.types[STRING](data=text), STRING))


class BagRecorder:
    """One bag at a time: open(path) ... add(...) ... close(); all writing happens on the recorder's thread."""

    def __init__(self, log: Callable[[str], None], on_closed: Callable[[dict], None],
                 max_queue_bytes: int = 256 << 20):
        self.log, self.on_closed, self.max_queue_bytes = log, on_closed, max_queue_bytes
        self.queue: queue.Queue[tuple] = queue.Queue()
        self.lock = threading.Lock()
        self.recording = False
        self.queued_bytes = 0
        self.dropped = 0
        self.thread = threading.Thread(target=self._run, name="bag_recorder", daemon=True)
        self.thread.start()

    # ----- any thread --------------------------------------------------------------------------------------------
    def open(self, path: Path, info: dict) -> None:
        """Start a bag at `path` (a new directory); `info` is passed through to the report."""
        self.close()  # a bag still open is finished first, never left without its metadata
        with self.lock:
            self.recording, self.dropped = True, 0
        self.queue.put(("open", Path(path), info))

    def add(self, topic: str, msgtype: str, stamp_ns: int, data: bytes) -> None:
        """Queue one message for the open bag; never blocks (a full queue drops and counts it)."""
        with self.lock:
            if not self.recording:
                return
            if self.queued_bytes + len(data) > self.max_queue_bytes:
                self.dropped += 1
                return
            self.queued_bytes += len(data)
        self.queue.put(("msg", topic, msgtype, stamp_ns, data))

    def add_text(self, topic: str, stamp_ns: int, text: str) -> None:
        self.add(topic, STRING, stamp_ns, string_cdr(text))

    def close(self) -> None:
        """Finish the open bag (its report goes to `on_closed` once the queue before it is written)."""
        with self.lock:
            if not self.recording:
                return
            self.recording = False
            dropped = self.dropped
        self.queue.put(("close", dropped))

    def shutdown(self, timeout: float = 10.0) -> None:
        self.close()
        self.queue.put(("stop",))
        self.thread.join(timeout)

    # ----- the recorder's thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        writer, report, connections = None, None, {}
        while True:
            item = self.queue.get()
            kind = item[0]
            if kind == "stop":
                return
            if kind == "open":
                writer, connections = None, {}
                report = {**item[2], "path": str(item[1]), "messages": 0, "dropped": 0, "error": None}
                try:
                    writer = Writer(item[1], version=9, storage_plugin=StoragePlugin.MCAP)
                    writer.open()
                except Exception as e:
                    writer = self._fail(None, report, e)
            elif kind == "msg":
                _, topic, msgtype, stamp_ns, data = item
                with self.lock:
                    self.queued_bytes -= len(data)
                if writer is None:
                    continue
                try:
                    if topic not in connections:
                        connections[topic] = writer.add_connection(topic, msgtype, typestore=TYPESTORE)
                    writer.write(connections[topic], stamp_ns, data)
                    report["messages"] += 1
                except Exception as e:
                    writer = self._fail(writer, report, e)
            elif kind == "close" and report is not None:
                report["dropped"] = item[1]
                if writer is not None:
                    try:
                        writer.close()
                    except Exception as e:
                        self._fail(writer, report, e)
                if report["dropped"]:
                    self.log(f"bag {report['path']}: {report['dropped']} messages dropped (the disk did not keep "
                             "up)")
                self._report(report)
                writer, report = None, None

    def _fail(self, writer: Writer | None, report: dict, e: Exception) -> None:
        """Give the bag up (the trial goes on); the report says why."""
        report["error"] = f"{type(e).__name__}: {e}"
        self.log(f"bag {report['path']} not written: {report['error']}; the trial goes on without it")
        if writer is not None:
            with contextlib.suppress(Exception):  # already reported; nothing more to save
                writer.abort()
        return None

    def _report(self, report: dict) -> None:
        try:
            self.on_closed(report)
        except Exception as e:  # the report is best effort too: never kill the thread that writes bags
            self.log(f"bag report failed: {type(e).__name__}: {e}")


def message_class(type_name: str) -> type | None:
    """'sensor_msgs/msg/Image' -> the rclpy message class, or None when it is not installed."""
    pkg, kind, name = (type_name.split("/") + ["", ""])[:3]
    try:
        return getattr(importlib.import_module(f"{pkg}.{kind}"), name)
    except (ImportError, AttributeError, ValueError):
        return None


class TopicTap:
    """Raw subscriptions on the recorded topics, made as each appears in the ROS graph, feeding a BagRecorder."""

    def __init__(self, node: Node, recorder: BagRecorder, topic_names: list[str]):
        self.node, self.recorder = node, recorder
        self.wanted = {n for n in topic_names if n}
        self.tapped: dict[str, str] = {}
        self.group = ReentrantCallbackGroup()  # recording never waits for the eval manager's own callbacks
        self.timer = node.create_timer(1.0, self.discover, callback_group=self.group)
        self.lock = threading.Lock()

    def discover(self) -> None:
        with self.lock:
            for name, types in self.node.get_topic_names_and_types():
                if name in self.wanted and name not in self.tapped:
                    self._tap(name, types[0])
            if self.wanted <= set(self.tapped):
                self.timer.cancel()

    def _tap(self, name: str, type_name: str) -> None:
        cls = message_class(type_name)
        if cls is None or type_name not in TYPESTORE.types:
            self.node.get_logger().warning(f"topic {name} ({type_name}) is not recorded: type unknown here")
            self.tapped[name] = type_name
            return
        best_effort = any(p.qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT
                          for p in self.node.get_publishers_info_by_topic(name))
        qos = QoSProfile(depth=100, history=HistoryPolicy.KEEP_LAST, durability=DurabilityPolicy.VOLATILE,
                         reliability=ReliabilityPolicy.BEST_EFFORT if best_effort else ReliabilityPolicy.RELIABLE)
        clock = self.node.get_clock()
        self.node.create_subscription(
            cls, name, lambda data, n=name, t=type_name: self.recorder.add(n, t, clock.now().nanoseconds, data),
            qos, raw=True, callback_group=self.group)
        self.tapped[name] = type_name
