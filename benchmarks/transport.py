#!/usr/bin/env python
"""Transport round trip on loopback: one observation in, one action chunk out, no model.

Payload: 2 RGB cameras 224x224x3 uint8, a 9-float32 state and an instruction string; reply: a fixed 16x8 float32
chunk. The client (this process) and each echo server (its own process, multiprocessing "spawn") talk over TCP on
127.0.0.1. A timed round trip includes client-side encoding of the observation and decoding of the reply.

Paths, measured in the same run, interleaved in rounds (the order rotates every round; each figure is the median
over rounds of the per-round statistic):

- ours:      policy_runtime.protocol (version 2) over ZeroMQ DEALER -> ROUTER (tcp). The client encodes a real
             `infer` request with protocol.encode_frames (msgpack header; each image an attached frame sent without
             a copy, as PolicyClient does) and decodes the reply with protocol.parse_reply; the server loop receives
             without copying, decodes and validates the request with protocol.parse_request against a 2-camera
             contract and answers an `actions` reply (request_id, timing, the fixed chunk pre-packed as ExtType 1).
- ours-v1:   the same with protocol version 1 framing: one msgpack frame, images inline as ExtType 1.
- zmq-floor: (informative) the same three frames, pre-encoded once, sent as they are; the server answers a
             fixed reply without decoding: ZeroMQ and the kernel alone, the floor under `ours`.
- websocket: an openpi wire baseline: a `websockets` asyncio server shaped like openpi's (compression off, no
             size cap, metadata sent on connect), the sync `websockets` client, and openpi's encoding byte for byte
             (policy_runtime.openpi_wire: numpy arrays as maps with bytes keys b"__ndarray__", b"data", b"dtype",
             b"shape"); same arrays and instruction, the same fixed chunk as reply.
- server:    (informative) the real policy_runtime PolicyServer (I/O thread, batch queue with max batch 1,
             worker thread, inproc reply pipe) with an echo backend returning the fixed chunk, driven by the real
             PolicyClient (hello once, then infer): what a robot sees, minus the model.
- openpi:    (informative) the same PolicyServer and echo backend behind its openpi front end
             (`serve --openpi-port`: websocket, key map, in-process DEALER), driven by the real
             `openpi_client.WebsocketClientPolicy`: what an openpi robot script sees, minus the model.

Issue targets (checked on `ours`): p50 <= 0.5 ms on loopback, and p50 <= 0.6x the websocket path's p50.
The `openpi` path needs the [dev] extra (openpi-client).

Prints a Markdown section, then one line of JSON (the last line of stdout); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import functools
import gc
import json
import multiprocessing as mp
import os
import signal
import statistics
import sys
import time
from typing import Any

import msgpack
import numpy as np
import zmq

from policy_runtime.backends import ChunkResult
from policy_runtime.openpi_wire import packb as ws_pack
from policy_runtime.openpi_wire import unpackb as ws_unpack
from policy_runtime.protocol import (
    UNKNOWN_KIND,
    ActionsReply,
    CameraSpec,
    Contract,
    InferRequest,
    Limits,
    ProtocolError,
    Timing,
    actions_reply,
    encode,
    encode_frames,
    error_reply,
    infer_request,
    pack_ndarray,
    parse_reply,
    parse_request,
)

CAMERAS = ("base_camera", "wrist_camera")
OPENPI_IMAGE_KEYS = ("observation/image", "observation/wrist_image")
IMAGE_SIZE, STATE_DIM, HORIZON, ACTION_DIM = 224, 9, 16, 8
INSTRUCTION = "pick up the red cube and move it to the goal"
P50_TARGET_MS, RATIO_TARGET = 0.5, 0.6
PATHS = ("ours", "ours-v1", "websocket", "server", "openpi", "zmq-floor")
SERVER_START_TIMEOUT_S = 60.0


# ----- payload ------------------------------------------------------------------------------------------------------
def make_observations(n: int, seed: int) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [({c: rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8) for c in CAMERAS},
             rng.standard_normal(STATE_DIM).astype(np.float32)) for _ in range(n)]


def fixed_chunk() -> np.ndarray:
    return np.linspace(-0.5, 0.5, HORIZON * ACTION_DIM, dtype=np.float32).reshape(HORIZON, ACTION_DIM)


def echo_contract() -> Contract:
    return Contract(model_sha256="0" * 64, backend="echo", provider="none", horizon=HORIZON, exec_steps=8,
                    action_dim=ACTION_DIM, num_steps=0, control_mode="pd_joint_delta_pos",
                    action_low=(-1.0,) * ACTION_DIM, action_high=(1.0,) * ACTION_DIM, clip_actions=True,
                    cameras=tuple(CameraSpec(c, IMAGE_SIZE, IMAGE_SIZE) for c in CAMERAS), state_dim=STATE_DIM,
                    state_layout=(("agent/qpos", STATE_DIM),), normalisation_sha256="0" * 64, control_hz=20.0,
                    text_max_len=64, default_instruction=INSTRUCTION, task="echo")


# ----- openpi observations (openpi's wire encoding: policy_runtime.openpi_wire) ---------------------------------------
def ws_observation(images: dict[str, np.ndarray], state: np.ndarray) -> dict:
    obs: dict[str, Any] = {key: images[cam] for key, cam in zip(OPENPI_IMAGE_KEYS, CAMERAS, strict=True)}
    obs.update({"observation/state": state, "prompt": INSTRUCTION})
    return obs


# ----- echo servers (each runs in its own spawned process) -----------------------------------------------------------
def _parent_alive(ppid: int) -> bool:
    return os.getppid() == ppid


def serve_ours(conn, stop, decode: bool = True) -> None:
    """ROUTER loop: parse_request (decode + validate), then an `actions` reply carrying the fixed chunk.

    With decode=False (the zmq-floor path) every message gets the same pre-encoded reply, nothing decoded.
    """
    ppid = os.getppid()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    try:
        sock.linger = 0
        sock.rcvhwm = 100
        sock.setsockopt(zmq.MAXMSGSIZE, 2 * Limits().max_message_bytes)
        sock.bind("tcp://127.0.0.1:*")
        conn.send(sock.getsockopt(zmq.LAST_ENDPOINT).decode())
        contract, limits = echo_contract(), Limits()
        chunk = fixed_chunk()
        packed = pack_ndarray(chunk)
        canned = encode(actions_reply(ActionsReply(1, chunk, "echo", 0.0, True, 0, Timing()), packed))
        while not stop.is_set() and _parent_alive(ppid):
            if not sock.poll(100, zmq.POLLIN):
                continue
            for _ in range(256):  # bounded drain
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                t_recv, t0 = time.time(), time.perf_counter()
                envelope = [frames[0].bytes]
                if not decode:
                    sock.send_multipart([*envelope, canned])
                    continue
                try:
                    req = parse_request(frames[1].buffer, contract, limits, [f.buffer for f in frames[2:]])
                    if not isinstance(req, InferRequest):
                        raise ProtocolError(UNKNOWN_KIND, "this echo server answers infer only")
                except ProtocolError as e:
                    sock.send_multipart([*envelope, encode(error_reply(e.code, e.message, e.request_id))])
                    continue
                decode_ms = (time.perf_counter() - t0) * 1e3
                reply = ActionsReply(req.request_id, chunk, "echo", req.t_capture, True, 0,
                                     Timing(0.0, decode_ms, 0.0, 0.0, t_recv, time.time(), 1))
                sock.send_multipart([*envelope, encode(actions_reply(reply, packed))])
    except Exception as e:  # report instead of leaving the parent waiting
        conn.send(f"ERROR: {type(e).__name__}: {e}")
    finally:
        sock.close(linger=0)
        ctx.term()


def serve_websocket(conn, stop) -> None:
    """openpi-style: asyncio websockets server, metadata on connect, then unpack observation -> pack chunk."""
    try:
        asyncio.run(_serve_websocket(conn, stop, os.getppid()))
    except Exception as e:
        conn.send(f"ERROR: {type(e).__name__}: {e}")


async def _serve_websocket(conn, stop, ppid: int) -> None:
    from websockets.asyncio.server import serve

    chunk = fixed_chunk()
    metadata = {"server": "echo", "horizon": HORIZON, "action_dim": ACTION_DIM}

    async def handler(ws) -> None:
        await ws.send(ws_pack(metadata))
        prev_total_ms = 0.0
        async for message in ws:  # ends when the client disconnects
            t0 = time.perf_counter()
            obs = ws_unpack(message)
            if not isinstance(obs, dict) or "observation/state" not in obs:
                await ws.send("bad observation")
                continue
            reply = {"actions": chunk, "server_timing": {"infer_ms": 0.0, "prev_total_ms": prev_total_ms}}
            await ws.send(ws_pack(reply))
            prev_total_ms = (time.perf_counter() - t0) * 1e3

    async with serve(handler, "127.0.0.1", 0, compression=None, max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        conn.send(f"ws://127.0.0.1:{port}")
        while not stop.is_set() and _parent_alive(ppid):
            await asyncio.sleep(0.1)


class EchoBackend:
    """A Backend without a model: every request gets the fixed chunk."""

    name = "echo"

    def __init__(self) -> None:
        self._contract, self._chunk = echo_contract(), fixed_chunk()

    def contract(self) -> Contract:
        return self._contract

    def infer_batch(self, requests) -> list[ChunkResult]:
        return [ChunkResult(self._chunk.copy(), 0) for _ in requests]

    def close(self) -> None:
        pass


def _serve_until_stopped(conn, stop, start) -> None:
    """Run `start()` -> (server, address to send the client), until the benchmark stops or its parent dies."""
    ppid = os.getppid()
    server = None
    try:
        server, address = start()
        conn.send(address)
        while not stop.is_set() and _parent_alive(ppid):
            time.sleep(0.1)
    except Exception as e:
        conn.send(f"ERROR: {type(e).__name__}: {e}")
    finally:
        if server is not None:
            server.stop()


def serve_policy_server(conn, stop) -> None:
    """The real PolicyServer (max batch 1, no wait) around the echo backend."""
    from policy_runtime.server import PolicyServer, ServerConfig

    def start():
        server = PolicyServer(EchoBackend(), ServerConfig(bind="tcp://127.0.0.1:*", max_batch=1, max_wait_ms=0.0))
        return server, server.start_background()

    _serve_until_stopped(conn, stop, start)


def serve_openpi(conn, stop) -> None:
    """The same PolicyServer behind its openpi front end only (no ZeroMQ endpoint), keys mapped as a LIBERO client's."""
    from policy_runtime.openpi_map import OpenpiMap, StatePart
    from policy_runtime.openpi_server import OpenpiConfig, OpenpiServer
    from policy_runtime.server import PolicyServer, ServerConfig

    def start():
        server = PolicyServer(EchoBackend(), ServerConfig(bind=None, max_batch=1, max_wait_ms=0.0))
        key_map = OpenpiMap(dict(zip(CAMERAS, OPENPI_IMAGE_KEYS, strict=True)),
                            {"agent/qpos": (StatePart("observation/state"),)}, "prompt")
        front = OpenpiServer(server, key_map, OpenpiConfig(port=0))
        server.start_background()
        return server, front.url

    _serve_until_stopped(conn, stop, start)


SERVERS = {"ours": serve_ours, "ours-v1": serve_ours, "websocket": serve_websocket, "server": serve_policy_server,
           "openpi": serve_openpi, "zmq-floor": functools.partial(serve_ours, decode=False)}


# ----- clients (this process) ---------------------------------------------------------------------------------------
class OursClient:
    multipart = True  # protocol 2 framing; OursV1Client sends one frame

    def __init__(self, endpoint: str, timeout_s: float):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(endpoint)
        self.timeout_ms = int(timeout_s * 1000)
        self.rid = 0

    def request(self, images: dict[str, np.ndarray], state: np.ndarray) -> float:
        self.rid += 1
        t0 = time.perf_counter()
        msg = infer_request(self.rid, images, state, time.time(), INSTRUCTION)
        if self.multipart:
            self.sock.send_multipart(encode_frames(msg), copy=False)
        else:
            self.sock.send(encode(msg))
        if not self.sock.poll(self.timeout_ms, zmq.POLLIN):
            raise TimeoutError(f"ours: no reply within {self.timeout_ms} ms")
        header, *attached = self.sock.recv_multipart()
        reply = parse_reply(header, Limits(), attached)
        dt = time.perf_counter() - t0
        if not isinstance(reply, ActionsReply) or reply.request_id != self.rid:
            raise RuntimeError(f"ours: unexpected reply {reply!r:.200}")
        return dt

    def sizes(self, images: dict[str, np.ndarray], state: np.ndarray) -> tuple[int, int]:
        msg = infer_request(1, images, state, time.time(), INSTRUCTION)
        req = sum(len(f) for f in encode_frames(msg)) if self.multipart else len(encode(msg))
        reply = ActionsReply(1, fixed_chunk(), "echo", time.time(), True, 0, Timing())
        return req, len(encode(actions_reply(reply, pack_ndarray(fixed_chunk()))))

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


class OursV1Client(OursClient):
    multipart = False


class FloorClient(OursClient):
    """Sends one pre-encoded protocol-2 observation every time and does not decode the reply."""

    def request(self, images: dict[str, np.ndarray], state: np.ndarray) -> float:
        if not hasattr(self, "frames"):
            self.frames = encode_frames(infer_request(1, images, state, time.time(), INSTRUCTION))
        t0 = time.perf_counter()
        self.sock.send_multipart(self.frames, copy=False)
        if not self.sock.poll(self.timeout_ms, zmq.POLLIN):
            raise TimeoutError(f"zmq-floor: no reply within {self.timeout_ms} ms")
        self.sock.recv_multipart()
        return time.perf_counter() - t0


class WebsocketClient:
    def __init__(self, uri: str, timeout_s: float):
        from websockets.sync.client import connect

        self.stack = contextlib.ExitStack()
        self.conn = self.stack.enter_context(connect(uri, compression=None, max_size=None, open_timeout=timeout_s))
        self.timeout_s = timeout_s
        try:
            self.metadata = ws_unpack(self.conn.recv(timeout=timeout_s))
        except BaseException:
            self.stack.close()
            raise

    def request(self, images: dict[str, np.ndarray], state: np.ndarray) -> float:
        t0 = time.perf_counter()
        self.conn.send(ws_pack(ws_observation(images, state)))
        data = self.conn.recv(timeout=self.timeout_s)
        if isinstance(data, str):
            raise RuntimeError(f"websocket: server error {data[:200]}")
        reply = ws_unpack(data)
        dt = time.perf_counter() - t0
        if reply["actions"].shape != (HORIZON, ACTION_DIM):
            raise RuntimeError("websocket: bad chunk shape")
        return dt

    def sizes(self, images: dict[str, np.ndarray], state: np.ndarray) -> tuple[int, int]:
        reply = {"actions": fixed_chunk(), "server_timing": {"infer_ms": 0.0, "prev_total_ms": 0.0}}
        return len(ws_pack(ws_observation(images, state))), len(ws_pack(reply))

    def close(self) -> None:
        self.stack.close()


class ServerClient:
    def __init__(self, endpoint: str, timeout_s: float):
        from policy_runtime.client import PolicyClient

        self.client = PolicyClient(endpoint, timeout_ms=timeout_s * 1000, handshake_timeout_ms=timeout_s * 1000)
        self.client.connect()

    def request(self, images: dict[str, np.ndarray], state: np.ndarray) -> float:
        t0 = time.perf_counter()
        self.client.infer(images, state, instruction=INSTRUCTION)
        return time.perf_counter() - t0

    def sizes(self, images: dict[str, np.ndarray], state: np.ndarray) -> tuple[int, int]:
        req = infer_request(1, images, state, time.time(), INSTRUCTION, timeout_ms=self.client.timeout_ms)
        reply = ActionsReply(1, fixed_chunk(), "0" * 16, time.time(), True, 0, Timing())
        return sum(len(f) for f in encode_frames(req)), len(encode(actions_reply(reply, pack_ndarray(fixed_chunk()))))

    def close(self) -> None:
        self.client.close()


class OpenpiClient:
    """The real openpi_client.WebsocketClientPolicy, unchanged."""

    def __init__(self, uri: str, timeout_s: float):
        from openpi_client.websocket_client_policy import WebsocketClientPolicy

        self.policy = WebsocketClientPolicy(uri)

    def request(self, images: dict[str, np.ndarray], state: np.ndarray) -> float:
        t0 = time.perf_counter()
        reply = self.policy.infer(ws_observation(images, state))
        dt = time.perf_counter() - t0
        if reply["actions"].shape != (HORIZON, ACTION_DIM):
            raise RuntimeError("openpi: bad chunk shape")
        return dt

    def sizes(self, images: dict[str, np.ndarray], state: np.ndarray) -> tuple[int, int]:
        timing = {"infer_ms": 0.0, "queue_ms": 0.0, "batch_size": 1, "prev_total_ms": 0.0}
        return len(ws_pack(ws_observation(images, state))), len(ws_pack({"actions": fixed_chunk(),
                                                                          "server_timing": timing}))

    def close(self) -> None:
        self.policy._ws.close()  # the client has no close(); its connection is this attribute


CLIENTS = {"ours": OursClient, "ours-v1": OursV1Client, "websocket": WebsocketClient, "server": ServerClient,
           "openpi": OpenpiClient, "zmq-floor": FloorClient}


# ----- measurement --------------------------------------------------------------------------------------------------
def stats_ms(seconds: list[float]) -> dict:
    a = np.asarray(seconds) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()),
            "min_ms": float(a.min()), "max_ms": float(a.max()), "n": int(a.size)}


def run_block(client, observations, n: int) -> list[float]:
    times = []
    for i in range(n):
        images, state = observations[i % len(observations)]
        times.append(client.request(images, state))
    return times


def codec_costs(observations, reps: int) -> list[dict]:
    """In-process CPU cost of each encoding step (median microseconds over `reps` calls), for the two encodings."""
    def median_us(fn) -> float:
        for _ in range(min(20, reps)):
            fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return float(np.median(times) * 1e6)

    images, state = observations[0]
    contract, chunk = echo_contract(), fixed_chunk()
    packed = pack_ndarray(chunk)
    ours_req = encode(infer_request(1, images, state, 1.0, INSTRUCTION))
    v2_header, *v2_attached = encode_frames(infer_request(1, images, state, 1.0, INSTRUCTION))

    def ours_reply() -> bytes:
        r = ActionsReply(1, chunk, "echo", 1.0, True, 0, Timing(0.0, 0.1, 0.0, 0.0, 1.0, 1.0, 1))
        return encode(actions_reply(r, packed))

    ours_rep = ours_reply()
    ws_req, ws_rep_obj = ws_pack(ws_observation(images, state)), {"actions": chunk, "server_timing": {"infer_ms": 0.0}}
    ws_rep = ws_pack(ws_rep_obj)
    rows = [
        {"encoding": "ours (protocol 2: header + attached frames)",
         "client_encode_us": median_us(lambda: encode_frames(infer_request(1, images, state, 1.0, INSTRUCTION))),
         "server_decode_us": median_us(lambda: parse_request(v2_header, contract, Limits(), v2_attached)),
         "server_encode_us": median_us(ours_reply),
         "client_decode_us": median_us(lambda: parse_reply(ours_rep))},
        {"encoding": "ours v1 (one frame, ExtType 1)",
         "client_encode_us": median_us(lambda: encode(infer_request(1, images, state, 1.0, INSTRUCTION))),
         "server_decode_us": median_us(lambda: parse_request(ours_req, contract)),
         "server_encode_us": median_us(ours_reply),
         "client_decode_us": median_us(lambda: parse_reply(ours_rep))},
        {"encoding": "websocket baseline (openpi's encoding)",
         "client_encode_us": median_us(lambda: ws_pack(ws_observation(images, state))),
         "server_decode_us": median_us(lambda: ws_unpack(ws_req)),
         "server_encode_us": median_us(lambda: ws_pack(ws_rep_obj)),
         "client_decode_us": median_us(lambda: ws_unpack(ws_rep))},
    ]
    for r in rows:
        r["total_us"] = sum(v for k, v in r.items() if k.endswith("_us"))
    return rows


def start_server(ctx, path: str):
    parent, child = ctx.Pipe(duplex=False)
    stop = ctx.Event()
    proc = ctx.Process(target=SERVERS[path], args=(child, stop), name=f"echo-{path}", daemon=True)
    proc.start()
    child.close()
    return proc, stop, parent


def wait_endpoint(path: str, proc, conn) -> str:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if conn.poll(0.2):
            msg = conn.recv()
            if msg.startswith("ERROR"):
                raise RuntimeError(f"{path} server failed to start: {msg}")
            return msg
        if not proc.is_alive():
            raise RuntimeError(f"{path} server exited with code {proc.exitcode} before binding")
    raise RuntimeError(f"{path} server did not bind within {SERVER_START_TIMEOUT_S:.0f} s")


def stop_servers(servers: list) -> None:
    for _, stop, _ in servers:
        stop.set()
    for proc, _, conn in servers:
        proc.join(5.0)
        if proc.is_alive():
            proc.terminate()
            proc.join(5.0)
        if proc.is_alive():
            proc.kill()
            proc.join(5.0)
        conn.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000, help="timed round trips per path per round (default 2000)")
    p.add_argument("--warmup", type=int, default=200, help="untimed round trips per path per round (default 200)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported (default 3)")
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS), help="paths to measure (default all)")
    p.add_argument("--timeout-s", type=float, default=5.0, help="per round trip; a miss aborts the run")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.requests < 1 or args.warmup < 0 or args.rounds < 1 or args.timeout_s <= 0:
        p.error("--requests and --rounds must be >= 1, --warmup >= 0, --timeout-s > 0")
    paths = list(dict.fromkeys(args.paths))

    def on_signal(signum: int, _frame: object) -> None:  # run the finally blocks that stop the servers
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    malloc_env = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    observations = make_observations(4, args.seed)

    ctx = mp.get_context("spawn")
    servers, clients = [], {}
    per_round: dict[str, list[dict]] = {path: [] for path in paths}
    pooled: dict[str, list[float]] = {path: [] for path in paths}
    try:
        for path in paths:
            servers.append(start_server(ctx, path))
        for path, (proc, _, conn) in zip(paths, servers, strict=True):
            endpoint = wait_endpoint(path, proc, conn)
            clients[path] = CLIENTS[path](endpoint, args.timeout_s)
            print(f"[transport] {path}: server at {endpoint}", file=sys.stderr)
        for r in range(args.rounds):
            order = paths[r % len(paths):] + paths[:r % len(paths)]
            for path in order:
                run_block(clients[path], observations, args.warmup)
                gc.collect()
                times = run_block(clients[path], observations, args.requests)
                s = stats_ms(times)
                per_round[path].append(s)
                pooled[path] += times
                print(f"[transport] round {r + 1}/{args.rounds} {path}: p50 {s['p50_ms']:.3f} ms, "
                      f"p99 {s['p99_ms']:.3f} ms", file=sys.stderr)
        sizes = {path: clients[path].sizes(*observations[0]) for path in paths}
        print("[transport] codec costs ...", file=sys.stderr)
        codecs = codec_costs(observations, min(args.requests, 500))
    finally:
        for c in clients.values():
            try:
                c.close()
            except Exception as e:  # keep shutting the rest down
                print(f"[transport] closing a client: {e}", file=sys.stderr)
        stop_servers(servers)

    import websockets
    from common import command_line, machine_info

    rows = []
    for path in paths:
        med = {k: statistics.median(s[k] for s in per_round[path]) for k in ("p50_ms", "p99_ms", "mean_ms")}
        all_ = stats_ms(pooled[path])
        rows.append({"path": path, "request_bytes": sizes[path][0], "reply_bytes": sizes[path][1], **med,
                     "pooled_p50_ms": all_["p50_ms"], "pooled_p99_ms": all_["p99_ms"], "max_ms": all_["max_ms"],
                     "rounds": per_round[path]})
    by = {r["path"]: r for r in rows}
    ws_p50 = by["websocket"]["p50_ms"] if "websocket" in by else None
    for r in rows:
        r["p50_ratio_vs_websocket"] = r["p50_ms"] / ws_p50 if ws_p50 else None
    targets: dict[str, Any] = {"p50_target_ms": P50_TARGET_MS, "ratio_target": RATIO_TARGET}
    if "ours" in by:
        targets["p50_ms"] = by["ours"]["p50_ms"]
        targets["p50_met"] = by["ours"]["p50_ms"] <= P50_TARGET_MS
        ratio = by["ours"]["p50_ratio_vs_websocket"]
        targets["ratio"] = ratio
        targets["ratio_met"] = None if ratio is None else ratio <= RATIO_TARGET

    m = machine_info()
    versions = {"pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), "msgpack": ".".join(map(str, msgpack.version)),
                "websockets": websockets.__version__, "numpy": np.__version__}
    print("## Transport round trip (observation -> chunk, loopback TCP, no model)\n")
    print(f"- command: `{command_line()}`")
    print(f"- date: {date}")
    print(f"- machine: {m['platform']}, {m['processor']}, {m['cpu_count']} CPUs, Python {m['python']}; "
          + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"- settings: {args.requests} timed round trips per path per round after {args.warmup} warm-up, "
          f"{args.rounds} interleaved round(s) (order rotated), figures are medians over rounds; client and each "
          f"server in separate processes (spawn), 127.0.0.1"
          + (f"; malloc environment {malloc_env}" if malloc_env else "; default glibc malloc settings"))
    print(f"- payload: {len(CAMERAS)} cameras {IMAGE_SIZE}x{IMAGE_SIZE}x3 uint8, state {STATE_DIM} float32, "
          f"instruction of {len(INSTRUCTION)} bytes -> chunk {HORIZON}x{ACTION_DIM} float32\n")
    print("| path | request (B) | reply (B) | p50 (ms) | p99 (ms) | mean (ms) | max (ms) | p50 / websocket |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = "-" if r["p50_ratio_vs_websocket"] is None else f"{r['p50_ratio_vs_websocket']:.2f}"
        print(f"| {r['path']} | {r['request_bytes']} | {r['reply_bytes']} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
              f"{r['mean_ms']:.3f} | {r['max_ms']:.2f} | {ratio} |")
    print()
    print("CPU cost of the encodings alone (in-process, median of up to 500 calls, microseconds):\n")
    print("| encoding | client encode obs | server decode obs | server encode chunk | client decode chunk | sum |")
    print("|---|---:|---:|---:|---:|---:|")
    for c in codecs:
        print(f"| {c['encoding']} | {c['client_encode_us']:.0f} | {c['server_decode_us']:.0f} | "
              f"{c['server_encode_us']:.0f} | {c['client_decode_us']:.0f} | {c['total_us']:.0f} |")
    print()
    if "ours" in by:
        print(f"- target p50 <= {P50_TARGET_MS} ms (ours): {targets['p50_ms']:.3f} ms -> "
              f"{'met' if targets['p50_met'] else 'NOT met'}")
        if targets["ratio"] is None:
            print("- target p50 <= 0.6x websocket: not measured (websocket path not run)")
        else:
            print(f"- target p50 <= {RATIO_TARGET}x websocket (ours): {targets['ratio']:.2f}x -> "
                  f"{'met' if targets['ratio_met'] else 'NOT met'}")
    print()
    print(json.dumps({"benchmark": "transport", "date": date, "command": command_line(), "machine": m,
                      "versions": versions, "requests": args.requests, "warmup": args.warmup, "rounds": args.rounds,
                      "malloc_env": malloc_env, "results": rows, "codec_us": codecs, "targets": targets}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
