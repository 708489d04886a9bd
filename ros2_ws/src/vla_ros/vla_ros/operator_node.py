"""Scripted operator for the sim twin: does what a person does between trials, through the same interfaces.

Whenever the eval manager is in RESET it asks the sim twin for the scene reset (`/sim_twin/reset`, the
trial's seed) and then presses start (`/eval_manager/start`). It acts once per RESET and waits for the
state to change before acting again, so it can never reset the scene under a running trial.
"""

from __future__ import annotations

import json

from rclpy.node import Node
from std_msgs.msg import String
from std_srvs.srv import Trigger

from vla_ros import topics
from vla_ros.params import declare, run_node_main

DEFAULTS = {"reset_service": "/sim_twin/reset", "start_service": "/eval_manager/start"}


class ScriptedOperator(Node):
    def __init__(self, name: str = "scripted_operator", **node_kwargs):
        super().__init__(name, **node_kwargs)
        p = declare(self, DEFAULTS)
        self.reset_cli = self.create_client(Trigger, p["reset_service"])
        self.start_cli = self.create_client(Trigger, p["start_service"])
        self.state: dict = {}
        self.busy = False
        self.acted_on: str | None = None  # the RESET state message we already handled
        self.resets = 0
        self.create_subscription(String, topics.EVAL_STATE, self._on_state, topics.LATCHED_QOS)
        self.create_timer(0.1, self._tick)

    def _on_state(self, msg: String) -> None:
        self.state = json.loads(msg.data)
        if self.state.get("state") != "RESET":
            self.acted_on = None

    def _tick(self) -> None:
        if self.busy or self.state.get("state") != "RESET" or self.acted_on is not None:
            return
        if not (self.reset_cli.service_is_ready() and self.start_cli.service_is_ready()):
            return
        self.busy, self.acted_on = True, json.dumps(self.state)
        self.reset_cli.call_async(Trigger.Request()).add_done_callback(self._after_reset)

    def _after_reset(self, future) -> None:
        resp = future.result()
        if resp is None or not resp.success:
            self.get_logger().error(f"scene reset failed: {resp.message if resp else 'no reply'}")
            self.busy, self.acted_on = False, None
            return
        self.resets += 1
        self.start_cli.call_async(Trigger.Request()).add_done_callback(self._after_start)

    def _after_start(self, future) -> None:
        resp = future.result()
        if resp is None or not resp.success:
            self.get_logger().warning(f"start refused: {resp.message if resp else 'no reply'}")
            self.acted_on = None
        self.busy = False


def main(args: list[str] | None = None) -> int:
    return run_node_main(ScriptedOperator, args)
