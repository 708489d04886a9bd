"""Policy node: cameras + joint states -> policy_runtime server -> one normalised action per control tick.

The control tick runs the chunk executor (policy_runtime.chunking) on a thread of its own with a deadline
scheduler (vla_ros.ticker: ticks at t0 + k / control_hz, overruns counted and logged), so camera, joint-state
and diagnostics callbacks on the rclpy executor never delay it, and it never delays them; the state they share
is under one lock, held only to copy or update it. Inference runs on a worker thread that owns the
PolicyClient, so a slow or dead server never blocks the tick. With
`inference_wait_s` > 0 a tick that just asked for a chunk waits that long for it, which makes synchronous
execution match the simulator's (the chunk starts at the step whose observation produced it). When there
is no action (stale observation, chunk pending or late, server lost) nothing is published and the arm
holds; the safety filter's watchdog logs the hold. Actions go to the safety filter, never to a controller.
A chunk whose observation is older than `max_chunk_age_s` when it arrives is never executed (the arm already
moved on, and the filter may have held it as late): it is dropped and a fresh observation is sent instead.
The control rate, horizon and action joints are the contract's (received in the handshake); the node publishes
that contract, in its own serialisation, on `/vla/policy/spec` for the safety filter and the eval manager.
A server whose contract names no action joints, other ones than `action_names` (when set), or arm joints that
are not the first `state_joints` is refused at connect, with one line naming both lists.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.node import Node
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Float64MultiArray, MultiArrayDimension, String
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from policy_runtime.chunking import ChunkRequest, make_executor
from policy_runtime.client import ClientError, Expectation, PolicyClient
from policy_runtime.contract import PANDA_ARM_JOINTS, PANDA_FINGER_JOINTS
from policy_runtime.protocol import Contract
from vla_ros import topics
from vla_ros.actions import GRIPPER_ACTION
from vla_ros.controller_io import duration
from vla_ros.observation import ObservationError, StateBuilder, check_timing, fit_image
from vla_ros.params import declare, require, run_node_main
from vla_ros.robot import RobotModel
from vla_ros.ros_util import JointStateCache, diagnostic, image_to_rgb, rgb_to_image, stamp_s
from vla_ros.ticker import DeadlineTicker

DEFAULTS = {
    "runtime_endpoint": "tcp://127.0.0.1:5555",
    "timeout_ms": 1000.0,
    "handshake_timeout_ms": 1000.0,
    "executor": "sync",
    "expected_latency_s": 0.05,
    "inference_wait_s": 0.0,
    "camera_names": ["base_camera"],
    "camera_topics": ["/camera/camera/color/image_raw"],
    "state_joints": [*PANDA_ARM_JOINTS, *PANDA_FINGER_JOINTS],   # the robot's names for the state's qpos entries
    "action_names": "str[]",   # empty: the contract's action joints; set: checked against them
    "urdf": "",
    "base_link": "panda_link0",
    "tcp_link": "panda_hand_tcp",
    "base_pose": [-0.615, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
    "max_obs_age_s": 0.2,
    "max_skew_s": 0.1,
    "max_chunk_age_s": 0.3,   # observation -> chunk arrival; older chunks are dropped (<= the filter's late_action_s)
    "diagnostics_hz": 2.0,
    "publish_chunks": False,  # sync executor: each chunk, as it starts, on /vla/policy/chunk (the filter's
                              # send_whole_chunk sends it to the controller as one timed trajectory)
}


@dataclass
class _Job:
    epoch: int
    req: ChunkRequest
    images: dict[str, np.ndarray]
    state: np.ndarray
    t_capture: float
    instruction: str | None


class PolicyNode(Node):
    def __init__(self, name: str = "policy_node", **node_kwargs):
        super().__init__(name, **node_kwargs)
        p = declare(self, DEFAULTS)
        require(len(p["camera_names"]) == len(p["camera_topics"]), "camera_names and camera_topics differ in length")
        require(p["max_chunk_age_s"] > 0, "max_chunk_age_s must be > 0")
        require(p["executor"] in ("sync", "ensemble", "async-switch", "async-crossfade", "async-rtc"),
                f"unknown executor {p['executor']!r}")
        require(not p["publish_chunks"] or p["executor"] == "sync",
                "publish_chunks needs executor sync (the others blend chunks step by step)")
        self.p = p
        self.robot = RobotModel(p["urdf"], p["base_link"], p["tcp_link"], list(p["base_pose"]))
        self.client = PolicyClient(p["runtime_endpoint"], timeout_ms=p["timeout_ms"],
                                   handshake_timeout_ms=p["handshake_timeout_ms"], handshake_retries=1,
                                   expect=Expectation(action_dim=len(p["action_names"]) or None), name=name)
        self.joints = JointStateCache()
        self.frames: dict[str, Image] = {}
        self.frames_lock = threading.Lock()
        for cam, topic in zip(p["camera_names"], p["camera_topics"], strict=True):
            self.create_subscription(Image, topic, lambda m, c=cam: self._on_image(c, m), topics.SENSOR_QOS)
        self.create_subscription(JointState, topics.JOINT_STATES, self.joints.update, topics.SENSOR_QOS)
        self.create_subscription(String, topics.CONTROL_SOURCE, self._on_source, topics.LATCHED_QOS)
        self.create_subscription(String, topics.INSTRUCTION, self._on_instruction, topics.LATCHED_QOS)
        self.action_pub = self.create_publisher(JointState, topics.POLICY_ACTION, topics.COMMAND_QOS)
        self.step_pub = self.create_publisher(Float64MultiArray, topics.POLICY_STEP, topics.COMMAND_QOS)
        self.obs_pub = self.create_publisher(Image, topics.POLICY_OBS_IMAGE, topics.COMMAND_QOS)
        self.spec_pub = self.create_publisher(String, topics.POLICY_SPEC, topics.LATCHED_QOS)
        self.chunk_pub = self.create_publisher(JointTrajectory, topics.POLICY_CHUNK, topics.COMMAND_QOS) \
            if p["publish_chunks"] else None
        self.diag_pub = self.create_publisher(DiagnosticArray, topics.DIAGNOSTICS, 10)

        self.contract = None
        self.state_builder: StateBuilder | None = None
        self.chunker = None
        self.active, self.epoch, self.step = False, 0, 0
        self.instruction: str | None = None
        self.fault: str | None = None          # server / contract problem (error level)
        self.obs_problem: str | None = None    # last observation refusal (warn level)
        self.counts = {"actions": 0, "chunks": 0, "late_chunks": 0, "server_errors": 0, "stale_obs": 0, "holds": 0,
                       "overruns": 0, "skipped_ticks": 0}
        self.tick_periods: deque[float] = deque(maxlen=2000)   # wall seconds between ticks
        self.latencies: deque[float] = deque(maxlen=2000)      # capture stamp -> command, node clock seconds
        self.infer_s: deque[float] = deque(maxlen=2000)
        self._last_tick: float | None = None
        self.jobs: queue.Queue[_Job] = queue.Queue()
        self.results: queue.Queue[tuple] = queue.Queue()
        self.result_ready = threading.Event()
        self.control_hz = 0.0
        self.ticker: DeadlineTicker | None = None
        # The tick thread, the executor's callbacks and the inference worker share the executor state, the
        # counters and the trial epoch: each takes this lock only to read or update them (never while waiting).
        self.lock = threading.RLock()
        self.create_timer(1.0 / p["diagnostics_hz"], self._publish_diag)
        self.running = True
        # Started last: the worker reads everything above (it once raced the tick's start, and the node never acted).
        self.worker = threading.Thread(target=self._work, name="policy_inference", daemon=True)
        self.worker.start()

    # ----- inputs ------------------------------------------------------------------------------------------------
    def _on_image(self, cam: str, msg: Image) -> None:
        with self.frames_lock:
            self.frames[cam] = msg

    def _on_source(self, msg: String) -> None:
        active = msg.data == "policy"
        with self.lock:
            started = active and not self.active
            if started:
                self.epoch += 1  # replies to requests of an earlier trial are dropped
                if self.chunker is not None:
                    self.chunker.reset()  # never carry a chunk from one trial into the next
            self.active = active
        if started:
            self.get_logger().info("policy in control: executor reset")

    def _on_instruction(self, msg: String) -> None:
        self.instruction = msg.data or None

    # ----- inference worker ------------------------------------------------------------------------------------
    def _work(self) -> None:
        while self.running:
            try:
                self._work_once()
            except Exception as e:  # a bug here must not silently stop inference: report it, hold, carry on
                self.get_logger().error(f"inference worker: {type(e).__name__}: {e}\n{traceback.format_exc()}")
                self._set_fault(f"inference worker crashed ({type(e).__name__}: {e})")
                time.sleep(0.5)

    def _work_once(self) -> None:
        """One handshake attempt, one inference, or one health probe."""
        if self.contract is None:
            self._handshake()
            return
        try:
            job = self.jobs.get(timeout=0.1)
            while not self.jobs.empty():  # only the newest observation is worth a round trip
                job = self.jobs.get_nowait()
        except queue.Empty:
            if self.fault:
                self._probe()
            return
        t0 = time.monotonic()
        try:
            reply = self.client.infer(job.images, job.state, t_capture=job.t_capture,
                                      instruction=job.instruction, prev_chunk=job.req.leftover,
                                      delay_steps=job.req.delay_steps if job.req.leftover is not None else None)
            self.results.put(("ok", job, np.asarray(reply.actions, np.float64), time.monotonic() - t0))
        except ClientError as e:
            self.results.put(("error", job, str(e).splitlines()[0], time.monotonic() - t0))
        self.result_ready.set()

    def _probe(self) -> None:
        """After a failure, find out when the server is back, so the node reports healthy before it acts."""
        try:
            self.client.ping()
        except ClientError as e:
            self._set_fault(f"policy server: {str(e).splitlines()[0]}")
            time.sleep(0.5)
        else:
            self._set_fault(None)

    def _handshake(self) -> None:
        try:
            contract = self.client.connect()
            check_joint_names(contract.action_joints, tuple(self.p["action_names"]) or contract.action_joints,
                              tuple(self.p["state_joints"]))
            builder = StateBuilder(contract.state_layout, tuple(self.p["state_joints"]), self.robot.tcp_pose_world)
        except ClientError as e:
            self._set_fault(f"policy server: {str(e).splitlines()[0]}")
            time.sleep(0.5)
            return
        except ValueError as e:
            self._set_fault(f"contract: {e}")
            time.sleep(2.0)
            return
        with self.lock:
            self.state_builder, self.control_hz = builder, float(contract.control_hz)
            self.chunker = make_executor(self.p["executor"], contract.horizon, contract.exec_steps,
                                          contract.control_hz, self.p["expected_latency_s"])
            self.contract = contract
        self._publish_spec(contract)
        self._set_fault(None)
        if self.ticker is None:
            self._start_ticker(contract.control_hz)
        self.get_logger().info(f"policy server {self.p['runtime_endpoint']}: H={contract.horizon} "
                               f"C={contract.exec_steps} at {contract.control_hz} Hz ({contract.backend}, "
                               f"{contract.provider}); executor {self.p['executor']}")

    def _set_fault(self, fault: str | None) -> None:
        if fault != self.fault:
            if fault:
                self.get_logger().error(f"{fault}; the arm holds")
            else:
                self.get_logger().info("policy server reachable")
            self.fault = fault
            self._publish_diag()

    def _publish_spec(self, c: Contract) -> None:
        """The contract as the server sent it: the filter and the eval manager read it, nobody restates it."""
        self.spec_pub.publish(String(data=json.dumps(c.to_wire())))

    # ----- control tick -----------------------------------------------------------------------------------------
    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _start_ticker(self, control_hz: float) -> None:
        """The control tick on its own thread; on the ROS clock when the node runs on sim time (/clock)."""
        sim = self.get_parameter("use_sim_time").value
        self.ticker = DeadlineTicker(1.0 / control_hz, self._tick, clock=self.get_clock() if sim else None,
                                     name="policy_control_tick", on_overrun=self._on_overrun,
                                     on_error=self._on_tick_error).start()

    def _on_overrun(self, skipped: int, late_s: float) -> None:
        with self.lock:
            self.counts["overruns"] += 1
            self.counts["skipped_ticks"] += skipped
        self.get_logger().warning(f"control tick overrun: the next tick starts {1e3 * late_s:.1f} ms late"
                                  f"{f', {skipped} skipped' if skipped else ''}", throttle_duration_sec=2.0)

    def _on_tick_error(self, e: Exception) -> None:
        if not self.context.ok():
            self.ticker.stop()  # shutting down: publishers are gone
            return
        self.get_logger().error(f"control tick: {type(e).__name__}: {e}; holding\n{traceback.format_exc()}",
                                throttle_duration_sec=2.0)

    def _tick(self) -> None:
        wall = time.monotonic()
        with self.lock:
            if self._last_tick is not None:
                self.tick_periods.append(wall - self._last_tick)
            self._last_tick = wall
            self.step += 1
            step = self.step
            self._drain()
            if not self.active or self.chunker is None:
                return
        try:
            obs = self._observation()
            self.obs_problem = None
        except ObservationError as e:
            if self.obs_problem != str(e):
                self.get_logger().warning(f"observation refused: {e}; holding")
            self.obs_problem = str(e)
            with self.lock:
                self.counts["stale_obs"] += 1
                self.counts["holds"] += 1
            return
        with self.lock:
            req = self.chunker.request(step)
            if req is not None:
                self.result_ready.clear()
                self.jobs.put(_Job(self.epoch, req, obs[0], obs[1], obs[2], self.instruction))
        if req is not None and self.p["inference_wait_s"] > 0:
            self.result_ready.wait(self.p["inference_wait_s"])
        with self.lock:
            if req is not None:
                self._drain()
            action = self.chunker.action(step)
            if action is None:
                self.counts["holds"] += 1
                return
            chunk = self._starting_chunk(step)
        if chunk is not None:
            self._publish_chunk(chunk)
        self._publish_action(action, obs, step)

    def _starting_chunk(self, step: int) -> np.ndarray | None:
        """With publish_chunks, the actions the sync executor will send from this step on, if a chunk starts now."""
        if self.chunk_pub is None or self.chunker.executed != 1:
            return None
        first = step - self.chunker.chunk.start
        return self.chunker.chunk.actions[first:first + self.chunker.exec_steps]

    def _publish_chunk(self, actions: np.ndarray) -> None:
        msg = JointTrajectory()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.joint_names = list(self.contract.action_joints)
        dt = 1.0 / self.control_hz
        msg.points = [JointTrajectoryPoint(positions=[float(x) for x in a], time_from_start=duration(k * dt))
                      for k, a in enumerate(actions)]
        self.chunk_pub.publish(msg)

    def _drain(self) -> None:
        """Apply the worker's replies to the executor (the caller holds the lock)."""
        while True:
            try:
                status, job, payload, latency = self.results.get_nowait()
            except queue.Empty:
                return
            if job.epoch != self.epoch or self.chunker is None:
                continue
            age = self._now() - job.t_capture
            if status == "ok" and age > self.p["max_chunk_age_s"]:
                self.counts["late_chunks"] += 1
                self.chunker.reset()  # hold, and ask again with a fresh observation
                self.get_logger().warning(f"chunk dropped: its observation is {age:.3f} s old (max_chunk_age_s "
                                          f"{self.p['max_chunk_age_s']})", throttle_duration_sec=2.0)
            elif status == "ok":
                self.chunker.on_chunk(payload, job.req, self.step)
                delay = getattr(self.chunker, "delay", None)
                if delay is not None:
                    delay.add(latency)
                self.infer_s.append(latency)
                self.counts["chunks"] += 1
                self._set_fault(None)
            else:
                self.counts["server_errors"] += 1
                self.chunker.reset()  # ask again with a fresh observation; hold meanwhile
                self._set_fault(f"policy server: {payload}")

    def _observation(self) -> tuple[dict[str, np.ndarray], np.ndarray, float]:
        snap = self.joints.get()
        if snap is None:
            raise ObservationError("no joint state yet")
        with self.frames_lock:
            frames = dict(self.frames)
        missing = [c.name for c in self.contract.cameras if c.name not in frames]
        if missing:
            raise ObservationError(f"no frame yet from camera(s) {', '.join(missing)}")
        stamps = {c.name: stamp_s(frames[c.name].header.stamp) for c in self.contract.cameras}
        check_timing(self._now(), stamps, snap.stamp, self.p["max_obs_age_s"], self.p["max_skew_s"])
        try:
            images = {c.name: fit_image(image_to_rgb(frames[c.name]), c.height, c.width) for c in self.contract.cameras}
        except ValueError as e:
            raise ObservationError(str(e)) from None
        return images, self.state_builder.build(snap), min(stamps.values(), default=snap.stamp)

    def _publish_action(self, action: np.ndarray, obs, step: int) -> None:
        images, state, t_capture = obs
        now = self.get_clock().now()
        msg = JointState()
        msg.header.stamp = now.to_msg()
        msg.name = list(self.contract.action_joints)
        msg.position = [float(x) for x in action]
        self.action_pub.publish(msg)
        with self.lock:
            self.latencies.append(now.nanoseconds * 1e-9 - t_capture)
            self.counts["actions"] += 1
        for cam, rgb in images.items():
            self.obs_pub.publish(rgb_to_image(rgb, msg.header.stamp, f"{cam}#{step}"))
        rec = Float64MultiArray(data=[float(step), t_capture, *map(float, state), *map(float, action)])
        rec.layout.dim = [MultiArrayDimension(label=lbl, size=n, stride=n) for lbl, n in
                          (("step", 1), ("stamp", 1), ("state", len(state)), ("action", len(action)))]
        self.step_pub.publish(rec)

    # ----- diagnostics ------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        def pct(xs, q):
            return round(1e3 * float(np.percentile(xs, q)), 2) if xs else None

        with self.lock:
            counts = dict(self.counts)
            periods, latencies, infer = list(self.tick_periods), list(self.latencies), list(self.infer_s)
        jitter = [abs(x - 1.0 / self.control_hz) for x in periods] if self.control_hz else []
        return {**counts, "tick_period_ms_p50": pct(periods, 50), "tick_period_ms_p99": pct(periods, 99),
                "tick_jitter_ms_p50": pct(jitter, 50), "tick_jitter_ms_p99": pct(jitter, 99),
                "ticks_measured": len(periods), "capture_to_command_ms_p50": pct(latencies, 50),
                "capture_to_command_ms_p99": pct(latencies, 99), "infer_ms_p50": pct(infer, 50),
                "infer_ms_p99": pct(infer, 99)}

    def _publish_diag(self) -> None:
        if self.fault:
            level, msg = "error", self.fault
        elif self.obs_problem and self.active:
            level, msg = "warn", self.obs_problem
        else:
            level, msg = "ok", "in control" if self.active else "standing by"
        values = {"active": self.active, "step": self.step, **self.stats()}
        self.diag_pub.publish(diagnostic(self.get_name(), level, msg, values, self.get_clock().now().to_msg()))

    def close(self) -> None:
        self.running = False
        if self.ticker is not None:
            self.ticker.stop()
        self.worker.join(timeout=5.0)
        self.client.close()


def check_joint_names(model: tuple[str, ...], action_names: tuple[str, ...], state_joints: tuple[str, ...]) -> None:
    """The model's action joints (from its contract) must be the ones this node names, in the same order."""
    if not model:
        raise ValueError("the model's contract names no action joints: nothing says which joint each action drives")
    if model != action_names:
        raise ValueError(f"the model's action joints {list(model)} differ from action_names {list(action_names)}")
    arm = tuple(j for j in model if j != GRIPPER_ACTION)
    if state_joints[:len(arm)] != arm:
        raise ValueError(f"the model's arm joints {list(arm)} are not the first state_joints {list(state_joints)}")


def main(args: list[str] | None = None) -> int:
    return run_node_main(PolicyNode, args)
