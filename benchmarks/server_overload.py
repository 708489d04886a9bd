#!/usr/bin/env python
"""The policy server under abuse: fairness beside a flooding client, and memory under oversized messages.

The real CLI server (`python -m policy_runtime.cli serve EXPORT --providers cpu --threads 1`, defaults otherwise)
is started from the source tree --src (default: this checkout; pass an older checkout to measure "before").

(a) fairness: a flooding client (its own process, a DEALER keeping --window observations in flight, no pacing),
    a 50 Hz robot client (a PolicyClient with a 1 s timeout, one observation every 20 ms) and a monitor pinging
    at 20 Hz (its own process) run together for --duration seconds. Reported: the share of the robot's requests
    answered with a chunk, its latency p50/p99 over those, its error codes, the flood's chunks and refusals per
    second, and the ping round trip p50/p99/max.
(b) memory: on a fresh server, one client sends a ping header followed by N frames of M MB in one multipart
    message, for each NxM of --attacks in turn (default 8x120, 4x120, then 8x60: frames under the server's
    64 MiB frame cap). For each: the server's RSS before, its peak while the message arrives and is refused
    (VmRSS sampled every 10 ms), the reply (or none: disconnected), and its RSS after --idle seconds with no
    traffic.

Prints a Markdown section, then one line of JSON (the last line of stdout); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 180.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def observation(contract) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(0)
    images = {c.name: rng.integers(0, 256, (c.height, c.width, 3), dtype=np.uint8) for c in contract.cameras}
    return images, rng.standard_normal(contract.state_dim).astype(np.float32)


# ----- server ---------------------------------------------------------------------------------------------------------
class Server:
    """`policy-runtime serve` from --src in a subprocess, stopped by stop()."""

    def __init__(self, export: Path, src: Path, log_path: Path):
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        cmd = [sys.executable, "-m", "policy_runtime.cli", "serve", str(export), "--bind", self.endpoint,
               "--providers", "cpu", "--threads", "1", "--warmup", "1"]
        self.log = open(log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=src,
                                     env={**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"})

    def wait_ready(self):
        from policy_runtime.client import PolicyClient, Timeout

        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with code {self.proc.returncode}")
            with PolicyClient(self.endpoint, handshake_timeout_ms=500, handshake_retries=1) as c:
                try:
                    return c.connect()
                except Timeout:
                    continue
        raise RuntimeError("server not ready")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        self.log.close()


# ----- (a) fairness ---------------------------------------------------------------------------------------------------
def flood(endpoint: str, window: int, duration_s: float, result) -> None:
    """As fast as the server takes them: keep `window` observations in flight for duration_s."""
    import zmq

    from policy_runtime import protocol as P
    from policy_runtime.client import PolicyClient

    with PolicyClient(endpoint, timeout_ms=5000) as c:
        frames = P.encode_frames(P.infer_request(0, *observation(c.connect()), time.time()))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    sent, codes = 0, Counter()
    t_end = time.monotonic() + duration_s
    while time.monotonic() < t_end:
        while sent - sum(codes.values()) < window:
            sock.send_multipart(frames)
            sent += 1
        if sock.poll(5):
            while True:
                try:
                    reply = P.parse_reply(sock.recv_multipart(zmq.NOBLOCK)[0])
                except zmq.Again:
                    break
                codes["ok" if isinstance(reply, P.ActionsReply) else getattr(reply, "code", "?")] += 1
    sock.close(0)
    ctx.term()
    result.put(dict(codes))


def pinger(endpoint: str, duration_s: float, result, hz: float = 20.0) -> None:
    """A monitor: ping at `hz`; round trips in ms (a timeout counts as its 2 s bound)."""
    from policy_runtime.client import ClientError, PolicyClient

    times = []
    with PolicyClient(endpoint, timeout_ms=2000) as client:
        client.connect()
        t0 = time.monotonic()
        for i in range(int(duration_s * hz)):
            t = time.monotonic()
            with contextlib.suppress(ClientError):
                client.ping()
            times.append((time.monotonic() - t) * 1e3)
            time.sleep(max(0.0, t0 + (i + 1) / hz - time.monotonic()))
    result.put(times)


def robot(endpoint: str, duration_s: float, hz: float = 50.0) -> dict:
    from policy_runtime.client import PolicyClient, ServerError, Timeout

    codes: Counter[str] = Counter()
    latencies = []
    with PolicyClient(endpoint, timeout_ms=1000) as client:
        images, state = observation(client.connect())
        n = int(duration_s * hz)
        t0 = time.monotonic()
        for i in range(n):
            t = time.monotonic()
            try:
                client.infer(images, state)
                codes["ok"] += 1
                latencies.append((time.monotonic() - t) * 1e3)
            except ServerError as e:
                codes[e.code] += 1
            except Timeout:
                codes["timeout"] += 1
            time.sleep(max(0.0, t0 + (i + 1) / hz - time.monotonic()))
    lat = np.asarray(latencies)
    return {"requests": n, "ok": codes["ok"], "share_ok": codes["ok"] / n, "codes": dict(codes),
            "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
            "p99_ms": float(np.percentile(lat, 99)) if lat.size else None}


def fairness(export: Path, src: Path, args: argparse.Namespace, tmp: Path) -> dict:
    server = Server(export, src, tmp / "fairness.log")
    try:
        server.wait_ready()
        ctx = mp.get_context("spawn")
        result, pings = ctx.Queue(), ctx.Queue()
        flooder = ctx.Process(target=flood, args=(server.endpoint, args.window, args.duration + 2.0, result))
        monitor = ctx.Process(target=pinger, args=(server.endpoint, args.duration, pings))
        flooder.start()
        time.sleep(2.0)  # the flood is under way
        monitor.start()
        log(f"fairness: 50 Hz client for {args.duration:.0f} s beside the flood")
        r = robot(server.endpoint, args.duration)
        codes, ping_ms = result.get(timeout=60), np.asarray(pings.get(timeout=60))
        flooder.join(10)
        monitor.join(10)
        r["flood_per_s"] = {k: round(v / (args.duration + 2.0), 1) for k, v in codes.items()}
        r["ping_ms"] = {"p50": float(np.percentile(ping_ms, 50)), "p99": float(np.percentile(ping_ms, 99)),
                        "max": float(ping_ms.max()), "n": int(ping_ms.size)}
        return r
    finally:
        server.stop()


# ----- (b) memory -----------------------------------------------------------------------------------------------------
def attack(server: Server, frames: int, frame_mb: int, idle_s: float) -> dict:
    """One multipart message of `frames` x payload; server RSS before, peak (sampled), and after idle_s."""
    import zmq

    from policy_runtime import protocol as P

    before = server.rss_mib()
    peak, stop = [before], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak.append(server.rss_mib())
            time.sleep(0.01)

    payload = bytes(frame_mb * 1_000_000)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(server.endpoint)
    t0 = time.monotonic()
    sock.send_multipart([P.encode(P.ping_request(1)), *[payload] * frames], copy=False)
    reply = P.parse_reply(sock.recv()).code if sock.poll(15000) else "none (disconnected)"
    answered_s = time.monotonic() - t0
    time.sleep(1.0)  # let RSS settle after the refusal
    stop.set()
    sampler.join()
    sock.close(0)
    ctx.term()
    time.sleep(idle_s)
    return {"frames": frames, "frame_mb": frame_mb, "rss_before_mib": round(before, 1),
            "rss_peak_mib": round(max(peak), 1), "reply": reply, "reply_s": round(answered_s, 2),
            "rss_after_idle_mib": round(server.rss_mib(), 1), "idle_s": idle_s}


def memory(export: Path, src: Path, args: argparse.Namespace, tmp: Path) -> list[dict]:
    server = Server(export, src, tmp / "memory.log")
    try:
        server.wait_ready()
        out = []
        for frames, frame_mb in args.attacks:
            log(f"memory: {frames} x {frame_mb} MB")
            out.append(attack(server, frames, frame_mb, args.idle))
        return out
    finally:
        server.stop()


# ----- report ---------------------------------------------------------------------------------------------------------
def markdown(label: str, f: dict, m: list[dict]) -> str:
    rows = [f"### {label}", "",
            f"- 50 Hz client beside a flood: {f['ok']}/{f['requests']} answered with a chunk "
            f"({100 * f['share_ok']:.0f}%), p50 {f['p50_ms'] or float('nan'):.1f} ms, "
            f"p99 {f['p99_ms'] or float('nan'):.1f} ms; its other answers: "
            f"{ {k: v for k, v in f['codes'].items() if k != 'ok'} }; flood per second: {f['flood_per_s']}",
            f"- pings at 20 Hz meanwhile: p50 {f['ping_ms']['p50']:.1f} ms, p99 {f['ping_ms']['p99']:.1f} ms, "
            f"max {f['ping_ms']['max']:.1f} ms", "",
            "| attack | RSS before (MiB) | peak (MiB) | reply | RSS after idle (MiB) |", "|---|---:|---:|---|---:|"]
    rows += [f"| {a['frames']} x {a['frame_mb']} MB | {a['rss_before_mib']} | {a['rss_peak_mib']} | {a['reply']} "
             f"| {a['rss_after_idle_mib']} ({a['idle_s']:.0f} s) |" for a in m]
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", type=Path, required=True, help="export directory to serve")
    p.add_argument("--src", type=Path, default=ROOT, help="source tree whose policy_runtime serves (before/after)")
    p.add_argument("--label", default=None, help="name of this run in the report (default: --src)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of the 50 Hz client beside the flood")
    p.add_argument("--window", type=int, default=256, help="observations the flooder keeps in flight")
    p.add_argument("--idle", type=float, default=6.0, help="seconds of no traffic before the after-idle RSS")
    p.add_argument("--attacks", default="8x120,4x120,8x60", help="oversized messages, FRAMESxMB, comma-separated")
    args = p.parse_args()
    try:
        args.attacks = [tuple(int(x) for x in a.split("x")) for a in args.attacks.split(",")]
    except ValueError:
        p.error("--attacks is FRAMESxMB[,FRAMESxMB...], e.g. 8x120,4x120")
    if args.duration <= 0 or args.window < 1 or args.idle < 0:
        p.error("--duration > 0, --window >= 1, --idle >= 0")
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"server_overload_{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    f = fairness(args.export, args.src.resolve(), args, tmp)
    m = memory(args.export, args.src.resolve(), args, tmp)
    label = args.label or str(args.src)
    print(markdown(label, f, m))
    print(json.dumps({"label": label, "date": datetime.date.today().isoformat(), "cpu_count": os.cpu_count(),
                      "fairness": f, "memory": m}))


if __name__ == "__main__":
    main()
