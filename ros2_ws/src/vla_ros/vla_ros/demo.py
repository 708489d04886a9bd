"""`make demo`: the full ROS 2 stack on the sim twin, unattended, from the shipped checkpoint.

Exports the checkpoint to ONNX (once), serves it with `policy-runtime serve`, starts the sim twin, policy node,
safety filter, eval manager and a scripted operator in one process (the sim_eval.yaml of the launch files),
runs N trials and writes: the results table (summary.md), success with its Wilson interval, a video of the
recorded episodes and plots of inference latency, control period and safety interventions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[4]
CONFIG = ROOT / "launch" / "config"
SERVER_START_S = 180.0  # loading and warming up the export on a busy CPU host


def ensure_export(checkpoint: Path, out: Path) -> Path:
    if (out / "manifest.json").is_file():
        return out
    print(f"exporting {checkpoint} to {out} ...", flush=True)
    subprocess.run([sys.executable, "-m", "sim_trainer.cli", "export", "--ckpt", str(checkpoint), "--steps", "4",
                    "--out", str(out)], check=True, cwd=ROOT)
    return out


def start_server(export: Path, endpoint: str, log: Path) -> subprocess.Popen:
    """`policy-runtime serve`, returned once it answers: the nodes start against a server that is up."""
    from policy_runtime.client import ClientError, PolicyClient

    proc = subprocess.Popen([sys.executable, "-m", "policy_runtime.cli", "serve", str(export), "--bind", endpoint],
                            cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
    with PolicyClient(endpoint, timeout_ms=300) as client:
        try:
            client.wait_until_up(SERVER_START_S, alive=lambda: proc.poll() is None)
        except ClientError:
            if proc.poll() is not None:
                raise SystemExit(f"policy server exited with {proc.returncode}; see {log}") from None
            proc.kill()
            proc.wait()
            raise SystemExit(f"policy server did not answer in {SERVER_START_S:.0f} s; see {log}") from None
    return proc


def make_video(results: Path, out: Path) -> Path | None:
    import imageio.v2 as imageio
    import numpy as np

    from policy_runtime.episodes import list_episodes, read_episode

    frames = []
    for path in list_episodes(results, require_episodes=False):
        ep = read_episode(path)
        for cam in ep.images.values():
            border = np.zeros_like(cam[:1])
            border[..., 1 if ep.success else 0] = 255  # a green (success) or red (failure) frame between trials
            frames += list(cam) + [border[0]] * 5
            break
    if not frames:
        return None
    big = [np.kron(f, np.ones((4, 4, 1), np.uint8)) for f in frames]  # 64x64 is small on a screen
    imageio.mimsave(out, big, fps=20)
    return out


def make_plots(stats: dict, journal: list[dict], counts: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].hist([1e3 * x for x in stats["infer_s"]], bins=30)
    axes[0].set(title="policy server round trip per chunk", xlabel="ms", ylabel="chunks")
    axes[1].plot([1e3 * x for x in stats["tick_periods"]], lw=0.6)
    axes[1].set(title="control tick period (wall clock; twin in lockstep)", xlabel="tick", ylabel="ms")
    fig.tight_layout()
    paths.append(out / "latency.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    ends = [e for e in journal if e["event"] == "end"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].bar([str(e["trial"]) for e in ends], [e.get("interventions", 0) for e in ends],
                color=["tab:green" if e["outcome"] == "success" else "tab:red" for e in ends])
    axes[0].set(title="safety interventions per trial (green: success)", xlabel="trial", ylabel="count")
    axes[1].barh(list(counts) or ["none"], list(counts.values()) or [0])
    axes[1].set(title="interventions by reason (whole session)")
    fig.tight_layout()
    paths.append(out / "interventions.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vla_ros.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "ros_demo")
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "pushcube_rgb_small")
    ap.add_argument("--export", type=Path, help="existing export dir (default: OUT/export, made on first run)")
    ap.add_argument("--seed-start", type=int, default=100_000)
    ap.add_argument("--real-time-factor", type=float, default=1.0)
    a = ap.parse_args(argv)
    if a.trials < 1:
        print("error: --trials must be >= 1", file=sys.stderr)
        return 2
    os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("TQDM_DISABLE", "1")
    from vla_ros.stack import load_params, run

    out = a.out.resolve()
    results = out / f"run_{time.strftime('%Y%m%d_%H%M%S')}"
    results.mkdir(parents=True, exist_ok=True)
    export = ensure_export(a.checkpoint, (a.export or out / "export").resolve())
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    plan = results / "plan.yaml"
    plan.write_text(f"count: {a.trials}\nseed_start: {a.seed_start}\n")
    server = start_server(export, endpoint, results / "server.log")
    nodes: dict = {}
    try:
        params = load_params(CONFIG / "sim_eval.yaml", [
            f"eval_manager.plan={plan}", f"eval_manager.results_dir={results}", "eval_manager.exit_when_done=true",
            "eval_manager.console=false", f"policy_node.runtime_endpoint={endpoint}",
            f"sim_twin.real_time_factor={a.real_time_factor}"])
        names = ["sim_twin", "policy_node", "safety_filter", "eval_manager", "scripted_operator"]
        print(f"running {a.trials} trial(s) through the ROS 2 stack; results in {results}", flush=True)
        rc = run(params, names, on_ready=lambda ns: nodes.update({n.get_name(): n for n in ns}))
        if rc:
            return rc
    finally:
        server.terminate()
        server.wait(20)
    policy, safety = nodes["policy_node"], nodes["safety_filter"]
    journal = [json.loads(line) for line in (results / "journal.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((results / "summary.json").read_text())
    stats = {"infer_s": list(policy.infer_s), "tick_periods": list(policy.tick_periods)}
    (results / "node_stats.json").write_text(json.dumps({"policy_node": policy.stats(),
                                                         "safety_filter": dict(safety.filter.counts)}, indent=2))
    video = make_video(results, results / "episodes.mp4")
    plots = make_plots(stats, journal, dict(safety.filter.counts), results)
    print((results / "summary.md").read_text())
    lo, hi = summary["wilson95"]
    rate = summary["success_rate"] or 0.0
    print(f"success {summary['successes']}/{summary['judged']} = {100 * rate:.0f}% "
          f"(Wilson 95% {100 * lo:.0f}-{100 * hi:.0f}%)")
    # Capture-to-command latency is only meaningful on the wall clock: benchmarks/ros_stack.py measures it.
    print("policy node:", {k: v for k, v in policy.stats().items() if not k.startswith("capture_to_command")})
    print(f"video: {video}\nplots: {', '.join(map(str, plots))}\nepisodes: {results}/episodes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
