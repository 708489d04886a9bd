#!/usr/bin/env python
"""Policy server throughput and latency under concurrent clients, with dynamic batching off and on.

An export with K=4 denoising steps (--steps) is made from the checkpoint (--ckpt, or a randomly initialised model
with --random-size; or pass an existing export directory with --export) into a temporary directory. For each
batching mode the real CLI server is started as a subprocess on loopback:

    python -m policy_runtime.cli serve EXPORT --bind tcp://127.0.0.1:PORT --providers cpu --max-batch B
        --max-wait-ms W --max-queue Q --threads T

  off: --max-batch 1 --max-wait-ms 0;   on: --max-batch 16 --max-wait-ms 2 (--max-batch/--max-wait-ms)

Then, for each N in --clients, N client processes (multiprocessing "spawn", each a policy_runtime.client
PolicyClient: hello, a few warm-up requests, then a closed loop of real `infer` requests, one in flight, a fresh
observation from a small pool each time) run for --duration seconds. Reported per cell: total requests/s (sum over
clients of completed replies / the client's elapsed time), per-request round-trip latency p50/p99/mean (client
side), the mean batch size and mean model time taken from the replies' `timing` (batch_size, infer_ms), and errors.

Client processes and the server share this machine's cores, so on a small machine the clients' own CPU use
(encoding, Python) is part of what is measured.

Prints a Markdown section, then one line of JSON (the last line of stdout); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import multiprocessing as mp
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

MODES = ("off", "on")
SERVER_START_TIMEOUT_S = 180.0
WARMUP_REQUESTS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----- client process ---------------------------------------------------------------------------------------------
def client_worker(endpoint: str, index: int, duration_s: float, timeout_ms: float, seed: int, ready, start,
                  results) -> None:
    """One robot: hello, warm-up, wait for the common start, then a closed loop of infer requests for duration_s."""
    client = None
    try:
        from policy_runtime.client import ClientError, PolicyClient, ServerError, Timeout

        client = PolicyClient(endpoint, timeout_ms=timeout_ms, handshake_timeout_ms=max(timeout_ms, 5000.0),
                              name=f"bench-client-{index}")
        contract = client.connect()
        rng = np.random.default_rng(seed + index)
        pool = [({c.name: rng.integers(0, 256, (c.height, c.width, 3), dtype=np.uint8) for c in contract.cameras},
                 rng.standard_normal(contract.state_dim).astype(np.float32)) for _ in range(4)]
        for i in range(WARMUP_REQUESTS):
            client.infer(*pool[i % len(pool)])
        ready.put(("ready", index, ""))
        ppid, give_up = os.getppid(), time.monotonic() + 600.0
        while not start.wait(1.0):  # bounded, and ends early if the parent is gone
            if os.getppid() != ppid or time.monotonic() > give_up:
                return
        lat, batch, infer_ms, queue_ms = [], [], [], []
        errors: Counter[str] = Counter()
        t0 = time.perf_counter()
        end, last, i = t0 + duration_s, t0, 0
        while True:
            now = time.perf_counter()
            if now >= end:
                break
            images, state = pool[i % len(pool)]
            i += 1
            try:
                r = client.infer(images, state)
            except Timeout:
                errors["timeout"] += 1
                continue
            except ServerError as e:
                errors[e.code] += 1
                time.sleep(0.001)  # e.g. overloaded: do not spin on the server
                continue
            except ClientError as e:
                errors[type(e).__name__] += 1
                continue
            last = time.perf_counter()
            lat.append(last - now)
            batch.append(r.timing.batch_size)
            infer_ms.append(r.timing.infer_ms)
            queue_ms.append(r.timing.queue_ms)
        results.put({"index": index, "n": len(lat), "elapsed_s": last - t0, "lat_s": lat, "batch": batch,
                     "infer_ms": infer_ms, "queue_ms": queue_ms, "errors": dict(errors)})
    except BaseException as e:  # report to the parent instead of leaving it waiting
        ready.put(("error", index, f"{type(e).__name__}: {e}"))
        results.put({"index": index, "error": f"{type(e).__name__}: {e}"})
    finally:
        if client is not None:
            client.close()


# ----- server subprocess ------------------------------------------------------------------------------------------
class Server:
    """`policy-runtime serve` in a subprocess; always stopped by stop() (SIGTERM, then SIGKILL)."""

    def __init__(self, export: Path, mode: str, args: argparse.Namespace, max_queue: int, log_path: Path):
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        max_batch, max_wait = (1, 0.0) if mode == "off" else (args.max_batch, args.max_wait_ms)
        self.cmd = [sys.executable, "-m", "policy_runtime.cli", "serve", str(export), "--bind", self.endpoint,
                    "--providers", "cpu", "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait),
                    "--max-queue", str(max_queue), "--threads", str(args.server_threads)]
        self.log_path = log_path
        self.log = open(log_path, "wb")  # noqa: SIM115 (closed in stop())
        root = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def log_tail(self, n: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def wait_ready(self) -> dict:
        """Handshake until it answers; returns the contract's wire form. Bounded by SERVER_START_TIMEOUT_S."""
        from policy_runtime.client import PolicyClient, Timeout

        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with code {self.proc.returncode}:\n{self.log_tail()}")
            with PolicyClient(self.endpoint, handshake_timeout_ms=500, handshake_retries=1) as c:
                try:
                    return c.connect().to_wire()
                except Timeout:
                    continue
        raise RuntimeError(f"server not ready after {SERVER_START_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

    def health(self) -> dict:
        from policy_runtime.client import PolicyClient

        with PolicyClient(self.endpoint, timeout_ms=5000, handshake_timeout_ms=5000) as c:
            return c.ping()

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(15)
        finally:
            self.log.close()


# ----- one cell ---------------------------------------------------------------------------------------------------
def run_cell(ctx, endpoint: str, n_clients: int, args: argparse.Namespace) -> dict:
    ready, results, start = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=client_worker, name=f"bench-client-{i}", daemon=True,
                         args=(endpoint, i, args.duration, args.timeout_ms, args.seed, ready, start, results))
             for i in range(n_clients)]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + 60.0 + 10.0 * n_clients
        n_ready = 0
        while n_ready < n_clients:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"only {n_ready}/{n_clients} clients ready in time")
            try:
                what, index, msg = ready.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                if not all(p.is_alive() for p in procs):
                    raise RuntimeError("a client process died before it was ready") from None
                continue
            if what == "error":
                raise RuntimeError(f"client {index} failed: {msg}")
            n_ready += 1
        start.set()
        out = []
        deadline = time.monotonic() + args.duration + args.timeout_ms / 1e3 + 60.0
        while len(out) < n_clients:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"only {len(out)}/{n_clients} clients reported in time")
            try:
                r = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            if "error" in r:
                raise RuntimeError(f"client {r['index']} failed: {r['error']}")
            out.append(r)
        return summarise(out, n_clients)
    finally:
        start.set()  # release anyone still waiting, then make sure every client process is gone
        deadline = time.monotonic() + 15.0
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5.0)
            if p.is_alive():
                p.kill()
                p.join(5.0)


def summarise(per_client: list[dict], n_clients: int) -> dict:
    lat = np.concatenate([np.asarray(r["lat_s"], float) for r in per_client]) * 1e3
    batch = np.concatenate([np.asarray(r["batch"], float) for r in per_client])
    infer_ms = np.concatenate([np.asarray(r["infer_ms"], float) for r in per_client])
    queue_ms = np.concatenate([np.asarray(r["queue_ms"], float) for r in per_client])
    errors: Counter[str] = Counter()
    for r in per_client:
        errors.update(r["errors"])
    rps = sum(r["n"] / r["elapsed_s"] for r in per_client if r["n"] and r["elapsed_s"] > 0)

    def pct(a: np.ndarray, q: float) -> float | None:
        return float(np.percentile(a, q)) if a.size else None

    return {"clients": n_clients, "requests": int(lat.size), "req_per_s": rps,
            "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "mean_ms": float(lat.mean()) if lat.size else None,
            "mean_batch": float(batch.mean()) if batch.size else None, "max_batch_seen": int(batch.max(initial=0)),
            "mean_infer_ms": float(infer_ms.mean()) if infer_ms.size else None,
            "mean_queue_ms": float(queue_ms.mean()) if queue_ms.size else None,
            "errors": dict(errors), "per_client_requests": [r["n"] for r in per_client]}


# ----- main -------------------------------------------------------------------------------------------------------
def exit_on_signals() -> None:
    """SIGTERM/SIGHUP raise SystemExit in the main thread, so the finally blocks stop the server and clients."""
    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def make_export(args: argparse.Namespace, tmp: Path) -> tuple[Path, str, float | None]:
    """(export dir, description, export seconds or None when --export was given)."""
    if args.export:
        path = Path(args.export)
        if not (path / "manifest.json").is_file():
            sys.exit(f"error: {path} is not an export directory (no manifest.json)")
        return path, f"existing export `{path}`", None
    from inference_latency import resolve_checkpoint

    from sim_trainer.export.onnx_export import export_onnx

    ckpt, desc = resolve_checkpoint(args.ckpt, args.random_size, tmp, args.seed)
    print(f"[runtime_throughput] exporting {ckpt} with K={args.steps} ...", file=sys.stderr)
    t0 = time.perf_counter()
    export_onnx(ckpt, tmp / "export", args.steps)
    return tmp / "export", f"{desc} exported with K={args.steps}", time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="checkpoints/pushcube_rgb_small", help="checkpoint directory to export")
    p.add_argument("--random-size", choices=("tiny", "small", "base"), default=None,
                   help="ignore --ckpt and export a randomly initialised model of this size (PickCube-RGB shapes)")
    p.add_argument("--export", default=None, help="serve this existing export directory instead of exporting")
    p.add_argument("--steps", type=int, default=4, help="K of the export made from the checkpoint (default 4)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients (default 1 4 16)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per cell (default 10)")
    p.add_argument("--batching", nargs="+", choices=MODES, default=list(MODES), help="modes to run (default both)")
    p.add_argument("--max-batch", type=int, default=16, help="max batch when batching is on (default 16)")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="max wait when batching is on (default 2)")
    p.add_argument("--server-threads", type=int, default=0, help="server ORT intra-op threads (0 = ORT default)")
    p.add_argument("--timeout-ms", type=float, default=5000.0, help="client per-request timeout (default 5000)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.duration <= 0 or min(args.clients) < 1 or args.max_batch < 1 or args.max_wait_ms < 0 or args.steps < 1:
        p.error("--duration must be > 0, --clients/--max-batch/--steps >= 1, --max-wait-ms >= 0")
    clients = sorted(set(args.clients))
    exit_on_signals()
    modes = [m for m in MODES if m in args.batching]
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    ctx = mp.get_context("spawn")

    rows, commands, healths = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="runtime_throughput_") as tmp_name:
        tmp = Path(tmp_name)
        export, export_desc, export_s = make_export(args, tmp)
        manifest = json.loads((export / "manifest.json").read_text())
        for mode in modes:
            server = Server(export, mode, args, max_queue=max(32, 2 * max(clients)),
                            log_path=tmp / f"server_{mode}.log")
            commands[mode] = "python " + " ".join(server.cmd[1:]).replace(str(export), "EXPORT")
            try:
                print(f"[runtime_throughput] batching {mode}: starting server at {server.endpoint} ...",
                      file=sys.stderr)
                server.wait_ready()
                for n in clients:
                    print(f"[runtime_throughput] batching {mode}, {n} client(s), {args.duration:g} s ...",
                          file=sys.stderr)
                    row = {"batching": mode, **run_cell(ctx, server.endpoint, n, args)}
                    rows.append(row)
                    print(f"[runtime_throughput]   {row['req_per_s']:.1f} req/s, p50 {row['p50_ms'] or 0:.2f} ms, "
                          f"mean batch {row['mean_batch'] or 0:.2f}, errors {row['errors']}", file=sys.stderr)
                healths[mode] = server.health()
            except BaseException:
                print(f"[runtime_throughput] server log tail:\n{server.log_tail()}", file=sys.stderr)
                raise
            finally:
                server.stop()

    from common import command_line, machine_info

    by = {(r["batching"], r["clients"]): r for r in rows}
    gains = {n: by[("on", n)]["req_per_s"] / by[("off", n)]["req_per_s"]
             for n in clients if ("on", n) in by and ("off", n) in by and by[("off", n)]["req_per_s"]}
    m = machine_info()
    cams = ", ".join(f"{c['name']} {c['height']}x{c['width']}" for c in manifest["cameras"])

    def f(v, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    print("## Policy server throughput under concurrent clients (CPU, ONNX Runtime)\n")
    print(f"- command: `{command_line()}`")
    print(f"- date: {date}")
    print(f"- machine: {m['platform']}, {m['processor']}, {m['cpu_count']} CPUs, Python {m['python']}")
    print(f"- model: {export_desc}" + ("" if export_s is None else f" ({export_s:.1f} s)") +
          f"; K={manifest['num_steps']}, H={manifest['horizon']}, cameras {cams}, state {manifest['state']['dim']}")
    for mode, cmd in commands.items():
        print(f"- server, batching {mode}: `{cmd}`")
    print(f"- settings: {args.duration:g} s per cell, closed loop (one request in flight per client), clients are "
          f"separate processes on the same machine, {WARMUP_REQUESTS} warm-up requests per client; client timeout "
          f"{args.timeout_ms:g} ms\n")
    print("| batching | clients | req/s | p50 (ms) | p99 (ms) | mean (ms) | mean batch (per request) | "
          "model (ms, mean) | queue (ms, mean) | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        errs = ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items())) or "0"
        print(f"| {r['batching']} | {r['clients']} | {r['req_per_s']:.1f} | {f(r['p50_ms'], '.2f')} | "
              f"{f(r['p99_ms'], '.2f')} | {f(r['mean_ms'], '.2f')} | {f(r['mean_batch'], '.2f')} | "
              f"{f(r['mean_infer_ms'], '.2f')} | {f(r['mean_queue_ms'], '.2f')} | {errs} |")
    print()
    for n, g in gains.items():
        print(f"- {n} client(s): batching on / off throughput = {g:.2f}x")
    print()
    print(json.dumps({"benchmark": "runtime_throughput", "date": date, "command": command_line(), "machine": m,
                      "model": export_desc, "export_s": export_s, "num_steps": manifest["num_steps"],
                      "server_commands": commands, "duration_s": args.duration, "results": rows,
                      "batching_gain": {str(k): v for k, v in gains.items()}, "server_health": healths}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
