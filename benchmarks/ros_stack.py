#!/usr/bin/env python
"""The ROS 2 stack against direct simulation: success on the same seeds, control-period jitter, latency.

1. direct:  `sim-trainer eval --export EXPORT --episodes N --envs 2 --seed-start S` (ONNX Runtime in-process,
            ManiSkill pd_joint_delta_pos); success = success at any step of the task horizon (success_once).
2. ros:     `policy-runtime serve EXPORT` + sim twin + policy node + safety filter + eval manager + scripted
            operator (launch/config/sim_eval.yaml, one process), N trials on the same seeds; the twin runs in
            lockstep on sim time, a trial ends at the first success signal or after the horizon (5 s sim).
3. timing:  the same stack on the wall clock (no /clock, no lockstep: the twin free-runs, physics paced at 20 Hz
            real time, in its own process as hardware would be; the policy node in its own process as the launch
            files start it) for `--timing-trials` trials: the policy node's control tick period (p50/p99, jitter =
            |period - 1/control_hz|, overruns, skipped ticks) and capture-to-command latency: the camera image's
            header stamp -> the policy node's action publication (p50/p99; the safety filter forwards it in its
            subscription callback, one DDS hop later). The figures are the policy node's own, read from its last
            /diagnostics message (it keeps the last 2000 ticks).
            `--timing-only` skips 1 and 2.

Targets: |success(ros) - success(direct)| <= 10 points and the Wilson intervals overlap; at 20 Hz, period jitter
p99 <= 5 ms and capture-to-command p99 <= 2 control periods (100 ms).
Prints a Markdown table, then one line of JSON (the last line of stdout).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from common import command_line, machine_info
from diagnostic_msgs.msg import DiagnosticArray

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ros2_ws" / "src" / "vla_ros"))
CONFIG = ROOT / "launch" / "config"
NODES = ["sim_twin", "policy_node", "safety_filter", "eval_manager", "scripted_operator"]


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def direct_eval(export: Path, n: int, seed_start: int, out: Path) -> dict:
    r = subprocess.run([sys.executable, "-m", "sim_trainer.cli", "eval", "--export", str(export), "--episodes",
                        str(n), "--envs", "2", "--seed-start", str(seed_start), "--out", str(out), "--force"],
                       cwd=ROOT, capture_output=True, text=True, check=True)
    path = re.search(r"json: (\S+)", r.stdout).group(1)
    s = json.loads(Path(path).read_text())["summary"]
    return {"episodes": s["episodes"], "success": s["success_once"], "wilson95": s["success_once_wilson95"]}


def ros_run(endpoint: str, n: int, seed_start: int, out: Path, overrides: list[str],
            names: list[str] = NODES, on_ready=None) -> tuple[dict, dict]:
    from vla_ros.stack import load_params, run

    out.mkdir(parents=True, exist_ok=True)
    plan = out / "plan.yaml"
    plan.write_text(f"count: {n}\nseed_start: {seed_start}\n")
    params = load_params(CONFIG / "sim_eval.yaml", [
        f"eval_manager.plan={plan}", f"eval_manager.results_dir={out}", "eval_manager.exit_when_done=true",
        "eval_manager.console=false", f"policy_node.runtime_endpoint={endpoint}", *overrides])
    nodes: dict = {}
    def ready(ns: list) -> None:
        nodes.update({x.get_name(): x for x in ns})
        if on_ready is not None:
            on_ready(ns)

    rc = run(params, names, on_ready=ready)
    if rc:
        raise SystemExit(f"stack exited with {rc}")
    return json.loads((out / "summary.json").read_text()), nodes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--timing-trials", type=int, default=3)
    ap.add_argument("--seed-start", type=int, default=100_000)
    ap.add_argument("--export", type=Path, help="export dir (default: made from --checkpoint into OUT/export)")
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "pushcube_rgb_small")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_ros_stack")
    ap.add_argument("--timing-only", action="store_true", help="only the wall-clock timing run")
    ap.add_argument("--policy-nice", type=int, default=0,
                    help="nice increment of the policy node's process (negative: more CPU priority, needs root), as "
                         "a robot gives its control process priority")
    a = ap.parse_args()
    os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("TQDM_DISABLE", "1")
    from vla_ros.demo import ensure_export, start_server

    out = a.out.resolve() / datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    export = ensure_export(a.checkpoint, (a.export or a.out / "export").resolve())

    report: dict = {"benchmark": "ros_stack", "command": command_line(), "machine": machine_info(), "out": str(out)}
    endpoint = free_endpoint()
    if not a.timing_only:
        t0 = time.monotonic()
        report["direct"] = direct_eval(export, a.episodes, a.seed_start, out / "direct")
        report["direct"]["wall_s"] = round(time.monotonic() - t0)
    server = start_server(export, endpoint, out / "server.log")
    try:
        if not a.timing_only:
            t0 = time.monotonic()
            summary, nodes = ros_run(endpoint, a.episodes, a.seed_start, out / "ros", [])
            report["ros"] = {"episodes": summary["judged"], "success": summary["success_rate"],
                             "wilson95": summary["wilson95"], "aborted": summary["aborted"],
                             "safety_interventions": dict(nodes["safety_filter"].filter.counts),
                             "wall_s": round(time.monotonic() - t0)}
        report["timing"] = timing_run(endpoint, a.timing_trials, a.seed_start, out, a.policy_nice)
    finally:
        server.terminate()
        server.wait(20)
    if not a.timing_only:
        print_success(report)
    t = report["timing"]
    print(f"| timing at 20 Hz, wall clock ({t['ticks']} ticks, {t['overruns']} overruns, {t['skipped_ticks']} skipped) "
          "| p50 | p99 |\n|---|---|---|\n"
          f"| control period (ms) | {t['period_ms_p50']} | {t['period_ms_p99']} |\n"
          f"| period jitter abs(period - 50 ms) (ms) | {t['jitter_ms_p50']} | {t['jitter_ms_p99']} |\n"
          f"| camera capture -> command (ms) | {t['capture_to_command_ms_p50']} | {t['capture_to_command_ms_p99']} |\n"
          f"| policy server round trip (ms) | {t['server_round_trip_ms_p50']} | {t['server_round_trip_ms_p99']} |\n")
    print(json.dumps(report))
    return 0


def timing_run(endpoint: str, trials: int, seed_start: int, out: Path, policy_nice: int = 0) -> dict:
    wall = ["policy_node", "safety_filter", "eval_manager", "scripted_operator"]
    overrides = [f"{n}.use_sim_time=false" for n in wall] + ["policy_node.inference_wait_s=0.0",
                                                             f"policy_node.runtime_endpoint={endpoint}"]
    twin_overrides = ["sim_twin.publish_clock=false", "sim_twin.lockstep_timeout_s=0.0",
                      "sim_twin.real_time_factor=1.0"]
    # As deployed (one process per node): the twin stands in for hardware and the policy node runs alone, so
    # physics, rendering and the other nodes' callbacks do not share a GIL with the control tick.
    twin = stack_process("sim_twin", twin_overrides, out / "twin.log")
    policy = stack_process("policy_node", [o for o in overrides if o.startswith("policy_node.")],
                           out / "policy_node.log", policy_nice)
    last: dict = {}

    def listen(nodes: list) -> None:  # the policy node's own figures, as an operator sees them on /diagnostics
        def on_diag(msg: DiagnosticArray) -> None:
            for st in msg.status:
                if st.name.endswith("/policy_node"):
                    last.update({kv.key: kv.value for kv in st.values})
        nodes[0].create_subscription(DiagnosticArray, "/diagnostics", on_diag, 50)

    try:
        ros_run(endpoint, trials, seed_start, out / "timing",
                [o for o in overrides if not o.startswith("policy_node.")], NODES[2:], listen)
        deadline = time.monotonic() + 10
        while not last and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        for proc in (policy, twin):
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:  # never leave a free-running twin loading the host
                proc.kill()
                proc.wait()
    if not last:
        raise SystemExit(f"no diagnostics from the policy node; see {out / 'policy_node.log'}")

    def num(key: str) -> float | None:
        return None if last.get(key) in (None, "None") else float(last[key])

    keys = {"ticks": "ticks_measured", "overruns": "overruns", "skipped_ticks": "skipped_ticks",
            "period_ms_p50": "tick_period_ms_p50", "period_ms_p99": "tick_period_ms_p99",
            "jitter_ms_p50": "tick_jitter_ms_p50", "jitter_ms_p99": "tick_jitter_ms_p99",
            "capture_to_command_ms_p50": "capture_to_command_ms_p50",
            "capture_to_command_ms_p99": "capture_to_command_ms_p99",
            "server_round_trip_ms_p50": "infer_ms_p50", "server_round_trip_ms_p99": "infer_ms_p99"}
    return {k: num(v) if "ms" in k else int(num(v) or 0) for k, v in keys.items()}


def stack_process(node: str, overrides: list[str], log: Path, nice: int = 0) -> subprocess.Popen:
    """One node of launch/config/sim_eval.yaml in a process of its own, as the launch files start it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "ros2_ws/src/vla_ros"), str(ROOT)])}
    prefix = ["nice", "-n", str(nice)] if nice else []
    args = [sys.executable, "-m", "vla_ros.stack", str(CONFIG / "sim_eval.yaml"), "--nodes", node]
    return subprocess.Popen([*prefix, *args, *[x for o in overrides for x in ("--set", o)]], cwd=ROOT, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115


def print_success(report: dict) -> None:
    d, r = report["direct"], report["ros"]
    diff = 100 * (r["success"] - d["success"])
    overlap = r["wilson95"][0] <= d["wilson95"][1] and d["wilson95"][0] <= r["wilson95"][1]
    report.update(difference_points=diff, intervals_overlap=overlap)
    print(f"| path | trials | success | Wilson 95% | wall time |\n|---|---|---|---|---|\n"
          f"| direct `sim-trainer eval --export` | {d['episodes']} | {100 * d['success']:.1f}% | "
          f"{100 * d['wilson95'][0]:.1f}-{100 * d['wilson95'][1]:.1f}% | {d['wall_s']} s |\n"
          f"| ROS 2 stack (sim twin, lockstep) | {r['episodes']} | {100 * r['success']:.1f}% | "
          f"{100 * r['wilson95'][0]:.1f}-{100 * r['wilson95'][1]:.1f}% | {r['wall_s']} s |\n")
    print(f"difference {diff:+.1f} points (target within 10), intervals overlap: {overlap}; "
          f"ROS aborted trials: {r['aborted']}; safety interventions: {r['safety_interventions']}\n")


if __name__ == "__main__":
    sys.exit(main())
