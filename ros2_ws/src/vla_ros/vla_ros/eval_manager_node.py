"""Evaluation manager: runs the trial plan through IDLE -> RESET -> READY -> RUNNING -> JUDGE -> next.

RESET hands the arm to teleop (after driving it home, if a home pose is set) while the operator resets the
scene; `start` makes the arm hold (READY) and then, once the policy reports healthy, gives it to the policy
(RUNNING) with the trial's instruction. A trial ends on the success signal (`auto_judge`), the timeout, an
operator key, or a fault (policy server lost, e-stop, a control-source change this node did not make, as the
safety filter reports it): faults abort it. A trial starts only while the safety filter is armed and reports no
error, and not while the policy's contract (latched on /vla/policy/spec) states another `control_hz` than this
robot's; episodes are recorded with the contract's PolicySpec. A plan entry aborted `max_aborts` times is
given up (journaled, and listed in the summary) instead of being retried forever. Outcomes go to the
append-only journal, the summary and an episode per trial; with `record_bag` each trial is also a rosbag2
directory (MCAP) under `bags/` with the `bag_topics` as received, the trial's journal events and the policy's
contract, written on a thread of its own (vla_ros.bag_recorder); each bag's outcome is journaled as a `bag` event.
Driven by std_srvs/Trigger services (~/start, ~/success, ~/failure, ~/abort, ~/redo, ~/quit) and, when
run in a terminal, by single keys: s start, y success, n failure, a abort, r redo, q quit.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.node import Node
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Bool, Float64MultiArray, String
from std_srvs.srv import Trigger

from policy_runtime.contract import PolicySpec
from policy_runtime.episodes import EpisodeWriter
from policy_runtime.protocol import Contract, ProtocolError
from vla_ros import console, topics
from vla_ros.bag_recorder import EVENTS_TOPIC, BagRecorder, TopicTap
from vla_ros.params import ParamError, declare, end_spin, require, run_node_main
from vla_ros.recorder import TrialRecorder
from vla_ros.ros_util import image_to_rgb
from vla_ros.trials import Journal, PlanError, given_up, load_plan, next_plan_index, summarize, write_summary

STATES = ("IDLE", "RESET", "READY", "RUNNING", "JUDGE", "DONE")
KEYS = {"s": "start", "y": "success", "n": "failure", "a": "abort", "r": "redo", "q": "quit"}

DEFAULTS = {
    "plan": "",
    "results_dir": "outputs/ros_eval",
    "trial_timeout_s": 5.0,
    "ready_s": 0.3,
    "auto_judge": False,
    "success_topic": topics.SIM_SUCCESS,
    "autostart": True,
    "exit_when_done": False,
    "console": True,
    "episode_source": "real",
    "home_positions": "float[]",
    "home_joints": "str[]",
    "home_tolerance": 0.02,
    "home_timeout_s": 15.0,
    "control_hz": 20.0,          # the robot's control rate (the tick of homing): the policy's contract must agree
    "source_heartbeat_hz": 5.0,  # the control source is re-sent this often: the safety filter's lease
    "max_aborts": 3,             # aborted trials of one plan entry before it is given up
    "record_bag": True,          # each trial also as a rosbag2 directory (MCAP) under results_dir/bags
    "bag_topics": ["/camera/camera/color/image_raw", topics.JOINT_STATES, topics.POLICY_ACTION, topics.POLICY_STEP,
                   topics.POLICY_OBS_IMAGE, topics.POLICY_CHUNK, topics.TELEOP_COMMAND,
                   "/joint_trajectory_controller/joint_trajectory", topics.CONTROL_SOURCE, topics.INSTRUCTION,
                   topics.EVAL_STATE, topics.ESTOP, topics.DIAGNOSTICS],
    "bag_queue_mb": 256.0,       # messages waiting for the disk beyond this are dropped (and counted), never waited for
}


class EvalManagerNode(Node):
    def __init__(self, name: str = "eval_manager", **node_kwargs):
        super().__init__(name, **node_kwargs)
        p = declare(self, DEFAULTS)
        require(bool(p["plan"]), "parameter `plan` (trial plan YAML) is required")
        require(len(p["home_positions"]) == len(p["home_joints"]), "home_joints and home_positions differ in length")
        require(p["max_aborts"] >= 1, "max_aborts must be >= 1")
        try:
            self.plan = load_plan(p["plan"])
        except PlanError as e:
            raise ParamError(str(e)) from None
        self.p = p
        self.dir = Path(p["results_dir"])
        self.journal = Journal(self.dir / "journal.jsonl")
        for e in self.journal.recover():
            self.get_logger().warning(f"trial {e['trial']} was interrupted by a restart: marked aborted")
        self.lock = threading.RLock()
        self.state = "IDLE"
        self.state_since = self._now()
        self.trial: dict | None = None          # the running trial's start event
        self.outcome: tuple[str, str] | None = None
        self.spec: PolicySpec | None = None
        self.contract_problem: str | None = None  # a policy contract this robot disagrees with: no trial starts
        self.writer: EpisodeWriter | None = None
        self.recorder = TrialRecorder()
        self.spec_wire: str | None = None       # the policy's contract as received, for the bags
        self.bags: BagRecorder | None = None
        if p["record_bag"]:
            require(p["bag_queue_mb"] > 0, "bag_queue_mb must be > 0")
            self.bags = BagRecorder(self.get_logger().error, self._on_bag_closed, int(p["bag_queue_mb"] * 2**20))
            self.tap = TopicTap(self, self.bags, list(p["bag_topics"]))
        self.interventions = 0
        self.trial_interventions_start = 0
        self.joint_positions: dict[str, float] = {}
        self.policy_error: str | None = None    # the policy node's current error, if any
        self.filter_block: str | None = None    # why the safety filter would not let a trial run (error, not armed)
        self.homing = False
        self.source = "hold"
        self.source_pub = self.create_publisher(String, topics.CONTROL_SOURCE, topics.LATCHED_QOS)
        self.instruction_pub = self.create_publisher(String, topics.INSTRUCTION, topics.LATCHED_QOS)
        self.trial_pub = self.create_publisher(String, topics.EVAL_TRIAL, topics.LATCHED_QOS)
        self.state_pub = self.create_publisher(String, topics.EVAL_STATE, topics.LATCHED_QOS)
        self.home_pub = self.create_publisher(JointState, topics.TELEOP_COMMAND, topics.COMMAND_QOS)
        self.create_subscription(String, topics.POLICY_SPEC, self._on_spec, topics.LATCHED_QOS)
        self.create_subscription(Float64MultiArray, topics.POLICY_STEP, self._on_step, topics.COMMAND_QOS)
        self.create_subscription(Image, topics.POLICY_OBS_IMAGE, self._on_image, topics.COMMAND_QOS)
        self.create_subscription(DiagnosticArray, topics.DIAGNOSTICS, self._on_diag, 50)
        self.create_subscription(JointState, topics.JOINT_STATES, self._on_joints, topics.SENSOR_QOS)
        if p["auto_judge"]:
            self.create_subscription(Bool, p["success_topic"], self._on_success, topics.COMMAND_QOS)
        for cmd in KEYS.values():
            self.create_service(Trigger, f"~/{cmd}", lambda req, resp, c=cmd: self._srv(c, resp))
        if p["console"] and console.register("".join(KEYS), lambda k: self.command(KEYS[k])):
            print("operator console: s start  y success  n failure  a abort  r redo  q quit", flush=True)
        self.create_timer(1.0 / p["control_hz"], self._tick)
        require(p["source_heartbeat_hz"] > 0, "source_heartbeat_hz must be > 0")
        self.create_timer(1.0 / p["source_heartbeat_hz"], lambda: self.source_pub.publish(String(data=self.source)))
        self._set_source("hold")
        self._write_summary()
        if p["autostart"]:
            self._enter_reset()
        else:
            self._publish_state()

    # ----- operator commands ----------------------------------------------------------------------------------
    def _srv(self, cmd: str, resp):
        resp.success, resp.message = self.command(cmd)
        return resp

    def command(self, cmd: str) -> tuple[bool, str]:
        """Apply one operator command; returns (accepted, explanation)."""
        with self.lock:
            s = self.state
            if cmd == "quit":
                if s == "RUNNING":
                    self._end_running("aborted", "operator quit")
                    self._finalize()
                self._done("operator quit")
                return True, "session ended"
            if cmd == "start" and s == "IDLE":
                self._enter_reset()
                return True, "reset the scene, then start"
            if cmd == "start" and s == "RESET":
                self._set_state("READY")
                self._set_source("hold")
                return True, f"trial {self.trial_plan.index} starting"
            if cmd in ("success", "failure") and s in ("RUNNING", "JUDGE"):
                if s == "RUNNING":
                    self._end_running(cmd, "operator")
                else:
                    self.outcome = (cmd, "operator")
                self._finalize()
                return True, f"judged {cmd}"
            if cmd == "abort" and s in ("READY", "RUNNING", "JUDGE"):
                if s == "READY":
                    self._enter_reset()
                    return True, "start cancelled"
                if s == "RUNNING":
                    self._end_running("aborted", "operator abort")
                else:
                    self.outcome = ("aborted", "operator abort")
                self._finalize()
                return True, "trial aborted"
            if cmd == "redo" and s in ("RESET", "DONE", "JUDGE"):
                if s == "JUDGE":
                    self.outcome = ("aborted", "operator redo")
                    self._finalize()
                    return True, "trial discarded; it will be run again"
                last = self.journal.last_judged_trial()
                if last is None:
                    return False, "no judged trial to redo"
                self.journal.append({"event": "redo", "trial": last["trial"], "plan_index": last["plan_index"]})
                self._write_summary()
                self._enter_reset()
                return True, f"trial {last['trial']} discarded; plan entry {last['plan_index']} runs again"
            return False, f"'{cmd}' does nothing in state {s}"

    # ----- state machine -------------------------------------------------------------------------------------
    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _set_state(self, state: str) -> None:
        self.state, self.state_since = state, self._now()
        self.get_logger().info(f"state {state}" + (f" (plan entry {self.trial_plan.index})"
                                                   if state in ("RESET", "READY") else ""))
        self._publish_state()

    def _set_source(self, source: str) -> None:
        self.source = source
        self.source_pub.publish(String(data=source))

    def _enter_reset(self) -> None:
        self._give_up_exhausted()
        idx = next_plan_index(self.journal, self.plan, self.p["max_aborts"])
        if idx is None:
            self._done("plan complete")
            return
        self.trial_plan = self.plan[idx]
        self.trial_pub.publish(String(data=json.dumps({"index": idx, "seed": self.trial_plan.seed,
                                                       "instruction": self.trial_plan.instruction})))
        self._set_source("teleop")
        self.homing = bool(self.p["home_joints"])
        self._set_state("RESET")

    def _give_up_exhausted(self) -> None:
        """Journal each plan entry that has just used up its aborts, once, with the last abort's reason."""
        journaled = {e["plan_index"] for e in self.journal.events if e["event"] == "give_up"}
        for idx, last in given_up(self.journal, self.plan, self.p["max_aborts"]).items():
            if idx not in journaled:
                self.journal.append({"event": "give_up", "plan_index": idx, "seed": last.get("seed"),
                                     "aborts": self.p["max_aborts"], "reason": last.get("reason")})
                self.get_logger().error(f"plan entry {idx} given up after {self.p['max_aborts']} aborted trials "
                                        f"(last: {last.get('reason')})")

    def _tick(self) -> None:
        with self.lock:
            elapsed = self._now() - self.state_since
            if self.state == "RESET" and self.homing:
                self._send_home(elapsed)
            elif self.state == "READY" and elapsed >= self.p["ready_s"]:
                if self.policy_error is None and self.filter_block is None and self.contract_problem is None:
                    self._start_running()
                else:
                    waiting = (f"the policy: {self.policy_error}" if self.policy_error else
                               f"the safety filter: {self.filter_block}" if self.filter_block else
                               f"the policy contract: {self.contract_problem}")
                    self.get_logger().warning(f"waiting for {waiting}", throttle_duration_sec=5.0)
            elif self.state == "RUNNING" and elapsed >= self.p["trial_timeout_s"]:
                if self.p["auto_judge"]:
                    self._end_running("failure", "timeout")
                    self._finalize()
                else:
                    self._end_running(None, "timeout")

    def _send_home(self, elapsed: float) -> None:
        """Drive to the home pose (rate-limited by the safety filter), then leave the arm to the operator."""
        home = dict(zip(self.p["home_joints"], self.p["home_positions"], strict=True))
        if all(abs(self.joint_positions.get(j, float("inf")) - q) <= self.p["home_tolerance"] for j, q in home.items()):
            self.homing = False
            self.get_logger().info("arm at home: teleop is free")
            return
        if elapsed > self.p["home_timeout_s"]:
            self.homing = False
            self.get_logger().error(f"arm not home after {self.p['home_timeout_s']} s: reset it by teleop")
            return
        msg = JointState(name=list(home), position=[float(x) for x in home.values()])
        msg.header.stamp = self.get_clock().now().to_msg()
        self.home_pub.publish(msg)

    def _start_running(self) -> None:
        t = self.trial_plan
        self.instruction_pub.publish(String(data=t.instruction))
        self.trial = self.journal.append({"event": "start", "trial": self.journal.next_trial_number(),
                                          "plan_index": t.index, "seed": t.seed, "instruction": t.instruction})
        self.outcome = None
        self.trial_interventions_start = self.interventions
        self.recorder.start()
        self._open_bag()
        self._set_source("policy")
        self._set_state("RUNNING")

    def _end_running(self, outcome: str | None, reason: str) -> None:
        """Take the arm from the policy; with no outcome yet, wait in JUDGE for the operator."""
        self._set_source("hold")
        self.recorder.stop()
        self.outcome = (outcome, reason) if outcome else None
        self._set_state("JUDGE")
        if outcome is None:
            self.get_logger().info("trial timed out: judge it (y success / n failure / a abort / r redo)")

    def _finalize(self) -> None:
        outcome, reason = self.outcome
        steps = len(self.recorder)
        episode = self._save_episode(outcome, reason) if outcome != "aborted" else None
        kept = self.recorder.kept_steps([c.name for c in self.spec.cameras]) if self.spec else []
        self._append({"event": "end", "trial": self.trial["trial"], "plan_index": self.trial["plan_index"],
                      "seed": self.trial["seed"], "outcome": outcome, "reason": reason, "steps": steps,
                      "interventions": self.interventions - self.trial_interventions_start,
                      "episode": episode, "episode_steps": [kept[0], kept[-1]] if kept else None})
        self.get_logger().info(f"trial {self.trial['trial']} (plan {self.trial['plan_index']}, seed "
                               f"{self.trial['seed']}): {outcome} ({reason}), {steps} steps")
        self._close_bag()
        self.trial = None
        self._write_summary()
        self._enter_reset()

    def _append(self, event: dict) -> dict:
        """A journal event, also into the trial's bag."""
        event = self.journal.append(event)
        if self.bags is not None:
            self.bags.add_text(EVENTS_TOPIC, self.get_clock().now().nanoseconds, json.dumps(event, sort_keys=True))
        return event

    def _open_bag(self) -> None:
        if self.bags is None:
            return
        now = self.get_clock().now().nanoseconds
        self.bags.open(self.dir / "bags" / f"trial_{self.trial['trial']:04d}", {"trial": self.trial["trial"]})
        self.bags.add_text(EVENTS_TOPIC, now, json.dumps({"event": "recording", "producer": "vla_ros eval_manager",
                                                           "episode_source": self.p["episode_source"]}))
        self.bags.add_text(EVENTS_TOPIC, now, json.dumps(self.trial, sort_keys=True))
        if self.spec_wire is not None:
            self.bags.add_text(topics.POLICY_SPEC, now, self.spec_wire)

    def _close_bag(self) -> None:
        if self.bags is not None:
            self.bags.close()

    def _on_bag_closed(self, report: dict) -> None:
        """Journal where each trial's bag is and what became of it (a bag that failed says why)."""
        path = Path(report["path"])
        bag = str(path.relative_to(self.dir)) if path.is_relative_to(self.dir) else str(path)
        with self.lock:
            self.journal.append({"event": "bag", "trial": report["trial"], "bag": bag, "messages": report["messages"],
                                 "dropped": report["dropped"], "error": report["error"]})

    def _save_episode(self, outcome: str, reason: str) -> str | None:
        if self.spec is None:
            self.get_logger().error("no policy spec received: the trial is journaled without an episode")
            return None
        try:
            if self.writer is None:
                self.writer = EpisodeWriter(self.dir, self.spec, meta={"producer": "vla_ros eval_manager"})
            ep = self.recorder.episode(self.spec, self.trial["instruction"], outcome == "success",
                                       self.p["episode_source"], {"trial": self.trial["trial"],
                                                                  "plan_index": self.trial["plan_index"],
                                                                  "seed": self.trial["seed"], "reason": reason})
            return str(self.writer.write(ep).relative_to(self.dir))
        except Exception as e:  # a recording problem must never stop the evaluation
            self.get_logger().error(f"episode not saved: {e}")
            return None

    def _done(self, why: str) -> None:
        self._set_source("hold")
        self._set_state("DONE")
        summary = self._write_summary()
        self.get_logger().info(f"session done ({why}): {summary['successes']}/{summary['judged']} successes")
        if self.p["exit_when_done"]:
            threading.Timer(0.5, self._shutdown).start()

    def _shutdown(self) -> None:
        end_spin(self)

    def _write_summary(self) -> dict:
        summary = summarize(self.journal, self.plan, self.p["max_aborts"])
        write_summary(self.dir, summary)
        return summary

    def _publish_state(self) -> None:
        s = summarize(self.journal, self.plan, self.p["max_aborts"])
        plan_index = getattr(self, "trial_plan", None)
        self.state_pub.publish(String(data=json.dumps({
            "state": self.state, "plan_index": plan_index.index if plan_index else None,
            "trial": self.trial["trial"] if self.trial else None, "judged": s["judged"],
            "successes": s["successes"], "aborted": s["aborted"], "planned": s["planned"]})))

    # ----- inputs --------------------------------------------------------------------------------------------
    def _on_spec(self, msg: String) -> None:
        """The contract the policy node received: its rate must be this robot's, its spec is what episodes record."""
        try:
            contract = Contract.from_wire(json.loads(msg.data))
            spec = contract.policy_spec()
        except (ValueError, ProtocolError) as e:
            problem = f"unreadable policy contract ({e})"
        else:
            mismatch = contract.controller.mismatches(control_hz=self.p["control_hz"])
            problem = mismatch[0] if mismatch else None
            self.spec, self.spec_wire = spec, msg.data
        if problem and problem != self.contract_problem:
            self.get_logger().error(f"{problem}: no trial starts")
        self.contract_problem = problem

    def _on_step(self, msg: Float64MultiArray) -> None:
        dims = {d.label: d.size for d in msg.layout.dim}
        self.recorder.add_step(list(msg.data), int(dims.get("state", 0)))

    def _on_image(self, msg: Image) -> None:
        if self.recorder.recording:
            self.recorder.add_image(msg.header.frame_id, image_to_rgb(msg))

    def _on_joints(self, msg: JointState) -> None:
        self.joint_positions.update(zip(msg.name, msg.position, strict=False))

    def _on_success(self, msg: Bool) -> None:
        if msg.data:
            with self.lock:
                if self.state == "RUNNING":
                    self._end_running("success", "success signal")
                    self._finalize()

    def _on_diag(self, msg: DiagnosticArray) -> None:
        for st in msg.status:
            values = {kv.key: kv.value for kv in st.values}
            if st.name.endswith("/safety_filter") and "interventions" in values:
                self.interventions = int(values["interventions"])
            if st.name.endswith("/policy_node"):
                self.policy_error = st.message if st.level == DiagnosticStatus.ERROR else None
            if st.name.endswith("/safety_filter"):
                self.filter_block = st.message if st.level == DiagnosticStatus.ERROR or \
                    values.get("armed") == "False" else None
            if st.level == DiagnosticStatus.ERROR and st.name.endswith(("/policy_node", "/safety_filter")):
                with self.lock:
                    if self.state == "RUNNING":
                        self._end_running("aborted", f"{st.name}: {st.message}")
                        self._finalize()

    def close(self) -> None:
        console.close()
        if self.bags is not None:
            self.bags.shutdown()


def main(args: list[str] | None = None) -> int:
    return run_node_main(EvalManagerNode, args)
