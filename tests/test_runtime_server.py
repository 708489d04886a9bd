"""Serving over real ZeroMQ sockets on 127.0.0.1 with real ONNX Runtime sessions on a tiny real export."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from policy_runtime import protocol as P
from policy_runtime.backends.onnx_backend import OnnxBackend, OnnxOptions
from policy_runtime.client import ContractMismatch, Expectation, PolicyClient, ServerError, Timeout
from policy_runtime.curve import CurveClientKeys, CurveServerKeys
from policy_runtime.protocol import Limits
from policy_runtime.server import PolicyServer, ServerConfig
from tests.ros_fixtures import wait_for

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


# ----- fixtures -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint dir, export dir) of a real, untrained tiny flow VLA; a few seconds to build."""
    import torch

    from policy_runtime.contract import CameraSpec, PolicySpec
    from sim_trainer.data.normalize import NormStats, Stats
    from sim_trainer.export.onnx_export import export_onnx
    from sim_trainer.models.checkpoint import save_checkpoint
    from sim_trainer.models.config import ModelConfig
    from sim_trainer.models.flow_vla import FlowVLA

    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("runtime")
    spec = PolicySpec(task="PickCube-v1", control_mode="pd_joint_delta_pos", obs_mode="rgb",
                      cameras=(CameraSpec("base_camera", 32, 32),), state_layout=(("agent/qpos", 9), ("agent/qvel", 9)),
                      action_dim=8, action_low=(-1.0,) * 8, action_high=(1.0,) * 8, control_hz=20.0,
                      instruction="pick up the red cube and move it to the goal")
    cfg = ModelConfig.from_size("tiny", camera_names=("base_camera",), image_size=32, state_dim=18, action_dim=8,
                                horizon=16, exec_steps=8, num_steps=4)
    rng = np.random.default_rng(0)
    norm = NormStats(Stats.of(rng.normal(size=(100, 18))), Stats.of(rng.uniform(-1, 1, size=(100, 8))))
    save_checkpoint(tmp / "ckpt", FlowVLA(cfg, norm), spec, norm)
    export_onnx(tmp / "ckpt", tmp / "export", num_steps=4)
    return tmp / "ckpt", tmp / "export"


@pytest.fixture(scope="module")
def backend(tiny_export) -> OnnxBackend:
    return OnnxBackend(tiny_export[1], OnnxOptions(intra_op_threads=1, warmup_runs=1, allow_spinning=False))


class SlowBackend:
    """The real ONNX backend plus a fixed delay per batch (a loaded GPU, a big model)."""

    def __init__(self, inner: OnnxBackend, delay_s: float):
        self.inner, self.delay_s, self.name = inner, delay_s, inner.name

    def contract(self) -> P.Contract:
        return self.inner.contract()

    def infer_batch(self, requests):
        time.sleep(self.delay_s)
        return self.inner.infer_batch(requests)

    def close(self) -> None:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def serve():
    """Factory: start a server in background threads on a free loopback port; all are stopped at teardown."""
    servers: list[PolicyServer] = []

    def start(backend, port: int | None = None, **cfg) -> PolicyServer:
        server = PolicyServer(backend, ServerConfig(bind=f"tcp://127.0.0.1:{port or free_port()}", **cfg))
        server.start_background()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def clients():
    made: list[PolicyClient] = []

    def make(endpoint: str, **kw) -> PolicyClient:
        kw.setdefault("timeout_ms", 3000)
        c = PolicyClient(endpoint, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def observation(seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    return ({"base_camera": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)},
            rng.standard_normal(18).astype(np.float32))


class RawClient:
    """A bare DEALER socket for sending arbitrary (malformed) frames."""

    def __init__(self, endpoint: str, kind: int = zmq.DEALER):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(kind)
        self.sock.linger = 0
        self.sock.connect(endpoint)

    def ask(self, *frames: bytes, timeout_ms: int = 3000):
        self.sock.send_multipart(list(frames))
        assert self.sock.poll(timeout_ms), "no reply"
        return P.parse_reply(self.sock.recv_multipart()[-1])

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


# ----- handshake and inference ----------------------------------------------------------------------------------------
def test_handshake_returns_the_manifests_contract(backend, serve, clients, tiny_export):
    server = serve(backend)
    import json
    m = json.loads((tiny_export[1] / "manifest.json").read_text())
    c = clients(server.endpoint).connect()
    assert (c.horizon, c.exec_steps, c.action_dim, c.num_steps, c.state_dim) == (16, 8, 8, 4, 18)
    assert c.model_sha256 == m["model_sha256"] and c.normalisation_sha256 == m["normalisation"]["sha256"]
    assert c.cameras == (P.CameraSpec("base_camera", 32, 32),) and c.control_hz == 20.0
    assert c.provider == "CPUExecutionProvider" and c.backend == "onnxruntime" and c.instruction_max_bytes == 47
    assert c.action_low == (-1.0,) * 8 and c.clip_actions and c.instance == server.instance


def test_infer_returns_a_clipped_chunk_with_timings(backend, serve, clients):
    server = serve(backend)
    client = clients(server.endpoint)
    images, state = observation()
    t0 = time.time()
    r = client.infer(images, state, noise_seed=5, t_capture=t0)
    assert r.actions.shape == (16, 8) and r.actions.dtype == np.float32
    assert r.actions.min() >= -1.0 and r.actions.max() <= 1.0 and r.clipped and r.clipped_values >= 0
    assert r.t_capture == t0 and r.timing.batch_size == 1
    assert r.timing.t_recv >= t0 - 1 and r.timing.t_send >= r.timing.t_recv
    assert min(r.timing.queue_ms, r.timing.decode_ms, r.timing.infer_ms, r.timing.encode_ms) >= 0
    same = client.infer(images, state, noise_seed=5)
    assert np.array_equal(same.actions, r.actions)  # the noise seed makes a request reproducible
    other = client.infer(images, state, noise_seed=5, instruction="push the cube")
    assert not np.array_equal(other.actions, r.actions)  # the instruction reaches the model
    health = client.ping()
    assert health["served"] == 3 and health["latency_ms"]["window"] == 3 and health["uptime_s"] > 0
    assert sum(health["latency_hist_ms"]["counts"]) == 3 and health["provider"] == "CPUExecutionProvider"


def test_contract_mismatch_is_refused_at_connect_with_one_line_each(backend, serve, clients):
    server = serve(backend)
    client = clients(server.endpoint, expect=Expectation(horizon=50, action_dim=8, cameras={"wrist": (224, 224)},
                                                         normalisation_sha256="00" * 32))
    with pytest.raises(ContractMismatch) as e:
        client.connect()
    assert len(e.value.mismatches) == 4
    assert "horizon: robot expects 50, server has 16" in e.value.mismatches


# ----- malformed input ------------------------------------------------------------------------------------------------
def test_malformed_frames_each_get_an_error_and_the_server_keeps_serving(backend, serve, clients):
    server = serve(backend, limits=Limits(max_array_bytes=64 << 10))
    raw = RawClient(server.endpoint)
    images, state = observation()

    def infer(**kw) -> bytes:
        msg = P.infer_request(42, images, state, 1.0)
        msg.update(kw)
        return P.encode(msg)

    cases = [
        ((os.urandom(64),), P.BAD_MSGPACK),
        ((b"\xc1\xc1",), P.BAD_MSGPACK),
        ((P.encode([1, 2]),), P.BAD_MESSAGE),
        ((P.encode({"kind": "shutdown", "request_id": 3}),), P.UNKNOWN_KIND),
        ((b"a", b"b", b"c"), P.BAD_FRAME),
        ((infer(images={"base_camera": np.zeros((16, 16, 3), np.uint8)}),), P.BAD_SHAPE),
        ((infer(images={"base_camera": np.zeros((32, 32, 3), np.float32)}),), P.BAD_DTYPE),
        ((infer(state=np.full(18, np.nan, np.float32)),), P.NON_FINITE),
        ((infer(images={}),), P.MISSING_CAMERA),
        ((infer(images={"base_camera": np.zeros((400, 400, 3), np.uint8)}),), P.ARRAY_TOO_LARGE),
        ((infer(instruction="x" * 100),), P.INSTRUCTION_TOO_LONG),
    ]
    msg = P.infer_request(43, images, state, 1.0)
    del msg["state"]
    cases.append(((P.encode(msg),), P.MISSING_FIELD))
    try:
        for frames, code in cases:
            reply = raw.ask(*frames)
            assert isinstance(reply, P.ErrorReply) and reply.code == code, (code, reply)
        reply = raw.ask(infer())
        assert isinstance(reply, P.ActionsReply) and reply.request_id == 42
    finally:
        raw.close()
    health = clients(server.endpoint).ping()
    assert health["errors"] == len(cases) and health["served"] == 1


def test_req_socket_clients_are_answered_too(backend, serve):
    server = serve(backend)
    raw = RawClient(server.endpoint, zmq.REQ)
    try:
        reply = raw.ask(P.encode(P.ping_request(1)))
        assert isinstance(reply, P.PongReply) and reply.instance == server.instance
    finally:
        raw.close()


@pytest.mark.parametrize("kind", [zmq.DEALER, zmq.REQ])
def test_both_framings_get_the_same_chunk_and_stray_frames_are_refused(backend, serve, kind):
    server = serve(backend)
    raw = RawClient(server.endpoint, kind)
    images, state = observation()
    try:
        v1 = raw.ask(P.encode(P.infer_request(1, images, state, 1.0, noise_seed=5)))
        frames = P.encode_frames(P.infer_request(2, images, state, 1.0, noise_seed=5))
        assert len(frames) == 2  # the 32x32 image travels as an attached frame
        v2 = raw.ask(*frames)
        assert isinstance(v1, P.ActionsReply) and isinstance(v2, P.ActionsReply), (v1, v2)
        assert v2.request_id == 2 and np.array_equal(v1.actions, v2.actions)
        stray = raw.ask(P.encode(P.ping_request(3)), b"stray")
        assert isinstance(stray, P.ErrorReply) and stray.code == P.BAD_FRAME and stray.request_id == 3
        assert isinstance(raw.ask(P.encode(P.ping_request(4))), P.PongReply)
    finally:
        raw.close()


def test_flood_is_bounded_and_answered_overloaded_at_once(backend, serve, clients):
    server = serve(SlowBackend(backend, 0.4), max_batch=1, max_queue=2)
    raw = RawClient(server.endpoint)
    images, state = observation()
    try:
        t0 = time.monotonic()
        for i in range(8):
            raw.sock.send(P.encode(P.infer_request(i, images, state, 1.0)))
        health = clients(server.endpoint).ping(timeout_ms=1000)  # answered while the worker is busy
        assert health["queue_depth"] <= 2
        replies = []
        while len(replies) < 8:
            assert raw.sock.poll(3000)
            replies.append((time.monotonic() - t0, P.parse_reply(raw.sock.recv())))
        refused = [t for t, r in replies if isinstance(r, P.ErrorReply) and r.code == P.OVERLOADED]
        served = [t for t, r in replies if isinstance(r, P.ActionsReply)]
        # one in inference (or not yet taken) + 2 queued are served; the rest are refused without waiting
        assert len(served) in (2, 3) and len(refused) + len(served) == 8
        assert max(refused) < 0.35 < max(served)
    finally:
        raw.close()


def test_requests_that_waited_past_their_timeout_are_not_run(backend, serve, clients):
    server = serve(SlowBackend(backend, 0.3), max_batch=1)
    raw = RawClient(server.endpoint)
    images, state = observation()
    try:
        raw.sock.send(P.encode(P.infer_request(1, images, state, 1.0)))
        raw.sock.send(P.encode(P.infer_request(2, images, state, 1.0, timeout_ms=50)))
        replies = {r.request_id: r for r in (P.parse_reply(raw.sock.recv()) for _ in range(2) if raw.sock.poll(3000))}
        assert isinstance(replies[1], P.ActionsReply)
        assert isinstance(replies[2], P.ErrorReply) and replies[2].code == P.EXPIRED
    finally:
        raw.close()


# ----- overload: fair shares, admission, deadlines, memory ----------------------------------------------------------
class CountingBackend(SlowBackend):
    """SlowBackend that counts the observations it actually computed."""

    def __init__(self, inner: OnnxBackend, delay_s: float):
        super().__init__(inner, delay_s)
        self.computed = 0

    def infer_batch(self, requests):
        self.computed += len(requests)
        return super().infer_batch(requests)


class Flooder:
    """A client sending observations as fast as the server takes them, `window` outstanding, in its own thread."""

    def __init__(self, endpoint: str, window: int = 64):
        self.raw, self.window = RawClient(endpoint), window
        self.sent = self.replies = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        frames = P.encode_frames(P.infer_request(0, *observation(), 1.0))
        while not self._stop.is_set():
            while self.sent - self.replies < self.window:
                self.raw.sock.send_multipart(frames)
                self.sent += 1
            if self.raw.sock.poll(5):
                while True:
                    try:
                        self.raw.sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.replies += 1

    def __enter__(self) -> Flooder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.raw.close()


def paced_client(client: PolicyClient, n: int, hz: float = 50.0) -> tuple[int, list[float]]:
    """A robot's control loop: n observations at `hz`; (chunks received, latencies in ms of those)."""
    ok, latencies = 0, []
    images, state = observation()
    t_start = time.monotonic()
    for i in range(n):
        t0 = time.monotonic()
        try:
            client.infer(images, state)
            ok += 1
            latencies.append((time.monotonic() - t0) * 1e3)
        except (ServerError, Timeout):
            pass
        time.sleep(max(0.0, t_start + (i + 1) / hz - time.monotonic()))
    return ok, latencies


def test_a_flooding_client_leaves_a_50hz_client_its_share(backend, serve, clients):
    server = serve(SlowBackend(backend, 0.02), max_batch=4, max_queue=16)
    robot = clients(server.endpoint, timeout_ms=1000)
    robot.connect()
    with Flooder(server.endpoint) as flood:
        wait_for(lambda: flood.replies > 50, 10, "the flood to be under way")
        ok, latencies = paced_client(robot, 50)
    health = robot.ping()
    assert health["errors_by_code"].get(P.OVERLOADED, 0) > 0  # the flood was refused beyond its share...
    assert ok >= 48, f"the 50 Hz client got {ok}/50 chunks beside a flood"  # ...and the robot was served
    assert np.percentile(latencies, 99) < 500


def test_admission_is_checked_before_the_request_is_decoded(backend, serve):
    server = serve(SlowBackend(backend, 5.0), max_batch=1, max_per_client=2)
    raw, probe = RawClient(server.endpoint), RawClient(server.endpoint)
    images, state = observation()
    try:
        raw.sock.send(P.encode(P.infer_request(0, images, state, 1.0)))
        # wait on state: request 0 has left the queue for the (5 s) inference, so the queue is this client's alone
        pings = []

        def in_inference() -> bool:
            pings.append(1)
            health = probe.ask(P.encode(P.ping_request(len(pings)))).health
            return health["requests"] > len(pings) and health["queue_depth"] == 0  # request 0 arrived, left the queue

        wait_for(in_inference, 30, "request 0 in inference", poll=0.02)
        for i in (1, 2):  # two queued: this client's share is full
            raw.sock.send(P.encode(P.infer_request(i, images, state, 1.0)))
        raw.sock.send(P.encode(P.infer_request(9, images, np.full(18, np.nan, np.float32), 1.0)))
        replies = {}
        while 9 not in replies:
            assert raw.sock.poll(3000), "no reply"
            r = P.parse_reply(raw.sock.recv())
            replies[r.request_id] = r
        # refused as over its share, not as non-finite: the NaN was never decoded
        assert isinstance(replies[9], P.ErrorReply) and replies[9].code == P.OVERLOADED, replies[9]
        assert "share" in replies[9].message
    finally:
        raw.close()
        probe.close()


def test_a_request_that_would_miss_its_deadline_is_not_computed(backend, serve):
    counting = CountingBackend(backend, 0.3)
    server = serve(counting, max_batch=1)
    raw = RawClient(server.endpoint)
    images, state = observation()
    try:
        raw.sock.send(P.encode(P.infer_request(1, images, state, 1.0)))
        raw.sock.send(P.encode(P.infer_request(2, images, state, 1.0)))
        # waits ~600 ms behind the first two, then would need ~300 ms more: the reply would come after 800 ms
        raw.sock.send(P.encode(P.infer_request(3, images, state, 1.0, timeout_ms=800)))
        replies = {r.request_id: r for r in (P.parse_reply(raw.sock.recv()) for _ in range(3) if raw.sock.poll(5000))}
        assert isinstance(replies[1], P.ActionsReply) and isinstance(replies[2], P.ActionsReply)
        assert isinstance(replies[3], P.ErrorReply) and replies[3].code == P.EXPIRED, replies[3]
        assert counting.computed == 2
    finally:
        raw.close()


def test_pings_stay_fast_while_the_batcher_is_busy_and_flooded(backend, serve, clients):
    server = serve(SlowBackend(backend, 0.2), max_batch=2, max_queue=8)
    monitor = clients(server.endpoint, timeout_ms=2000)
    monitor.connect()
    with Flooder(server.endpoint, window=256) as flood:
        wait_for(lambda: flood.replies > 100, 10, "the flood to be under way")
        times = []
        for _ in range(20):
            t0 = time.monotonic()
            monitor.ping()
            times.append((time.monotonic() - t0) * 1e3)
    assert max(times) < 150, times


def test_a_frame_over_the_message_cap_is_dropped_by_libzmq_before_it_is_buffered(backend, serve, clients):
    limits = Limits(max_message_bytes=1 << 20, max_array_bytes=1 << 18)
    server = serve(backend, limits=limits)
    assert server.router.getsockopt(zmq.MAXMSGSIZE) == limits.max_message_bytes
    raw = RawClient(server.endpoint)
    try:
        header = P.encode(P.ping_request(1))
        raw.sock.send_multipart([header, b"\0" * (3 << 19)])  # 1.5 MiB: over the cap, so never delivered
        assert not raw.sock.poll(1000), "a message with an oversized frame was answered (it was buffered)"
    finally:
        raw.close()
    assert clients(server.endpoint).infer(*observation()).actions.shape == (16, 8)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_a_refused_large_message_is_released_at_once(tiny_export, clients):
    """Before: the I/O loop kept the last message (here 120 MiB) alive until the next one arrived."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "policy_runtime.cli", "serve", str(tiny_export[1]), "--bind",
                             f"tcp://127.0.0.1:{port}", "--threads", "1", "--warmup", "1"], env=ENV,
                            stderr=subprocess.DEVNULL)
    try:
        client = clients(f"tcp://127.0.0.1:{port}", handshake_timeout_ms=1000, handshake_retries=30)
        client.infer(*observation())
        base = rss_mib(proc.pid)
        raw = RawClient(f"tcp://127.0.0.1:{port}")
        try:
            frame = b"\0" * (40 << 20)  # each frame under the 64 MiB cap, the message (120 MiB) over it
            reply = raw.ask(P.encode(P.ping_request(5)), frame, frame, frame, timeout_ms=30000)
        finally:
            raw.close()
        assert isinstance(reply, P.ErrorReply) and reply.code == P.MESSAGE_TOO_LARGE
        wait_for(lambda: rss_mib(proc.pid) < base + 40, 10, f"the server's RSS to fall back near {base:.0f} MiB")
    finally:
        proc.terminate()
        proc.wait(15)


# ----- client robustness ----------------------------------------------------------------------------------------------
def test_client_times_out_against_an_absent_server(clients):
    client = clients(f"tcp://127.0.0.1:{free_port()}", handshake_timeout_ms=150, handshake_retries=2)
    t0 = time.monotonic()
    with pytest.raises(Timeout, match="2 attempts"):
        client.connect()
    assert time.monotonic() - t0 < 1.0


def test_client_times_out_against_a_slow_server_then_recovers(backend, serve, clients):
    slow = SlowBackend(backend, 0.6)
    server = serve(slow)
    client = clients(server.endpoint, timeout_ms=200)
    images, state = observation()
    t0 = time.monotonic()
    with pytest.raises(Timeout):
        client.infer(images, state)
    assert time.monotonic() - t0 < 0.5 and client.stats.timeouts == 1
    slow.delay_s = 0.0
    time.sleep(0.5)  # the late answer to the abandoned request goes to the closed socket and is lost
    r = client.infer(images, state)
    assert r.actions.shape == (16, 8) and client.stats.reconnects == 1 and client.stats.handshakes == 2


def test_client_never_buffers_a_reply_frame_over_its_cap(clients):
    """A hostile server answering the handshake with a huge frame: the robot times out instead of holding it."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def hostile() -> None:
        while not stop.is_set():
            if router.poll(50):
                identity, *_ = router.recv_multipart()
                router.send_multipart([identity, b"\0" * (3 << 19)])

    thread = threading.Thread(target=hostile, daemon=True)
    thread.start()
    try:
        client = clients(f"tcp://127.0.0.1:{port}", handshake_timeout_ms=500, handshake_retries=1,
                         limits=Limits(max_message_bytes=1 << 20))
        with pytest.raises(Timeout):
            client.connect()
    finally:
        stop.set()
        thread.join(2)
        router.close(0)
        ctx.term()


def test_client_drops_replies_to_stale_request_ids():
    """A scripted ROUTER peer answers an old request id first; the client must skip it."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")
    contract = P.Contract(
        model_sha256="a" * 64, backend="fake", provider="none", horizon=2, exec_steps=1, action_dim=1, num_steps=1,
        control_mode="x", action_low=(-1.0,), action_high=(1.0,), clip_actions=True,
        cameras=(P.CameraSpec("c", 2, 2),), state_dim=1, state_layout=(("s", 1),), normalisation_sha256="b" * 64,
        control_hz=10.0, text_max_len=4, default_instruction="", instance="i1")

    def fake_server():
        for _ in range(2):
            if not router.poll(3000):
                return
            ident, data = router.recv_multipart()
            msg = P.decode(data)
            if msg["kind"] == "hello":
                router.send_multipart([ident, P.encode(P.hello_reply(msg["request_id"], contract))])
                continue
            for rid, value in ((msg["request_id"] - 1, 9.0), (msg["request_id"], 1.0)):
                r = P.ActionsReply(rid, np.full((2, 1), value, np.float32), "i1", 0.0, True, 0)
                router.send_multipart([ident, P.encode(P.actions_reply(r, P.pack_ndarray(r.actions)))])

    t = threading.Thread(target=fake_server)
    t.start()
    client = PolicyClient(f"tcp://127.0.0.1:{port}", timeout_ms=2000)
    try:
        r = client.infer({"c": np.zeros((2, 2, 3), np.uint8)}, np.zeros(1, np.float32))
        assert r.actions[0, 0] == 1.0 and client.stats.stale_dropped == 1
    finally:
        t.join()
        client.close()
        router.close(0)
        ctx.term()


def test_server_restart_while_a_client_runs(backend, serve, clients):
    port = free_port()
    first = serve(backend, port=port)
    client = clients(first.endpoint, timeout_ms=300, handshake_timeout_ms=300)
    images, state = observation()
    a = client.infer(images, state, noise_seed=1)
    first.stop()
    with pytest.raises(Timeout):  # nobody there
        client.infer(images, state)
    second = serve(backend, port=port)
    b = client.infer(images, state, noise_seed=1)
    assert np.array_equal(a.actions, b.actions) and client.contract.instance == second.instance
    assert client.stats.handshakes == 2
    # a restart between two calls (no timeout): the new instance id triggers a new handshake
    second.stop()
    third = serve(backend, port=port)
    client.infer(images, state)
    assert client.stats.server_restarts == 1 and client.contract.instance == third.instance


def test_client_killed_mid_request_does_not_disturb_the_server(backend, serve, clients):
    server = serve(SlowBackend(backend, 0.1), max_batch=1)
    script = textwrap.dedent(f"""
        import sys, numpy as np, zmq
        from policy_runtime import protocol as P
        s = zmq.Context().socket(zmq.DEALER); s.connect({server.endpoint!r})
        img = {{"base_camera": np.zeros((32, 32, 3), np.uint8)}}
        for i in range(10):
            s.send(P.encode(P.infer_request(i, img, np.zeros(18, np.float32), 0.0)))
        s.recv()
        print("mid-request", flush=True)
        sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"mid-request"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    client = clients(server.endpoint, timeout_ms=5000)
    images, state = observation()
    assert client.infer(images, state).actions.shape == (16, 8)
    assert client.ping()["requests"] >= 12


def test_two_clients_are_batched_and_match_unbatched_chunks(backend, serve, clients):
    batched = serve(backend, max_batch=4, max_wait_ms=400)
    single = serve(backend, max_batch=1)
    obs = [observation(1), observation(2)]
    results: dict[int, P.ActionsReply] = {}
    cs = [clients(batched.endpoint) for _ in obs]
    for c in cs:
        c.connect()
    barrier = threading.Barrier(2)

    def call(i: int) -> None:
        barrier.wait()
        results[i] = cs[i].infer(*obs[i], noise_seed=100 + i, instruction=["pick", "place"][i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i].timing.batch_size for i in range(2)] == [2, 2]
    ref = clients(single.endpoint)
    for i in range(2):
        alone = ref.infer(*obs[i], noise_seed=100 + i, instruction=["pick", "place"][i])
        assert alone.timing.batch_size == 1
        np.testing.assert_allclose(results[i].actions, alone.actions, atol=1e-5)


# ----- CURVE ----------------------------------------------------------------------------------------------------------
def test_curve_authorised_client_is_served_and_unknown_key_is_refused(backend, serve, clients, tmp_path):
    from policy_runtime.cli import main

    assert main(["keys", "--out", str(tmp_path / "keys"), "--client", "robot"]) == 0
    assert main(["keys", "--out", str(tmp_path / "other"), "--client", "intruder"]) == 0
    keys = tmp_path / "keys"
    server = serve(backend, curve=CurveServerKeys(keys / "server.key_secret", keys / "authorized_clients"))
    good = clients(server.endpoint, curve=CurveClientKeys(keys / "robot.key_secret", keys / "server.key"))
    assert good.infer(*observation()).actions.shape == (16, 8)
    intruder = clients(server.endpoint, handshake_timeout_ms=300, handshake_retries=1,
                       curve=CurveClientKeys(tmp_path / "other" / "intruder.key_secret", keys / "server.key"))
    with pytest.raises(Timeout):
        intruder.connect()
    plain = clients(server.endpoint, handshake_timeout_ms=300, handshake_retries=1)
    with pytest.raises(Timeout):
        plain.connect()
    assert good.ping()["served"] == 1


# ----- backends -------------------------------------------------------------------------------------------------------
def test_onnx_path_imports_no_torch(tiny_export):
    code = textwrap.dedent(f"""
        import sys
        import policy_runtime.server, policy_runtime.client, policy_runtime.cli, policy_runtime.check
        from policy_runtime.backends.onnx_backend import OnnxBackend, OnnxOptions
        from policy_runtime.protocol import InferRequest
        import numpy as np
        b = OnnxBackend({str(tiny_export[1])!r}, OnnxOptions(intra_op_threads=1, warmup_runs=1))
        r = InferRequest(1, 0.0, {{"base_camera": np.zeros((32, 32, 3), np.uint8)}}, np.zeros(18, np.float32))
        assert b.infer_batch([r])[0].actions.shape == (16, 8)
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "sim_trainer"))
        assert not bad, bad
        print("clean")
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "clean" in proc.stdout, proc.stderr


def test_require_gpu_fails_loudly_on_a_cpu_build(tiny_export):
    from policy_runtime.errors import UserError

    with pytest.raises(UserError, match="GPU provider is required"):
        OnnxBackend(tiny_export[1], OnnxOptions(require_gpu=True))


def test_torch_backend_matches_onnx_and_supports_rtc(tiny_export, backend):
    from policy_runtime.backends.torch_backend import TorchBackend, TorchOptions

    tb = TorchBackend(tiny_export[0], TorchOptions(warmup_runs=1))
    tc, oc = tb.contract(), backend.contract()
    assert tc.normalisation_sha256 == oc.normalisation_sha256 and tc.rtc and not oc.rtc
    fields = ("horizon", "action_dim", "cameras", "state_dim", "exec_steps", "default_instruction")
    assert [getattr(tc, f) for f in fields] == [getattr(oc, f) for f in fields]
    assert tc.controller == oc.controller and tc.policy_spec() == oc.policy_spec()  # one manifest reader for both
    reqs = [P.InferRequest(i, 0.0, *observation(i), noise_seed=i) for i in range(3)]
    for t, o in zip(tb.infer_batch(reqs), backend.infer_batch(reqs), strict=True):
        np.testing.assert_allclose(t.actions, o.actions, atol=1e-4)
    prev = np.full((16, 8), 0.5, np.float32)
    rtc = P.InferRequest(9, 0.0, *observation(0), noise_seed=0, prev_chunk=prev, delay_steps=3)
    (guided,) = tb.infer_batch([rtc])
    (free,) = tb.infer_batch([P.InferRequest(9, 0.0, *observation(0), noise_seed=0)])
    assert guided.rtc_applied and not free.rtc_applied
    # the frozen prefix is pulled toward the leftover
    assert np.abs(guided.actions[:3] - 0.5).mean() < np.abs(free.actions[:3] - 0.5).mean()


# ----- CLI ------------------------------------------------------------------------------------------------------------
def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "policy_runtime.cli", *args], env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_check_passes_on_the_tiny_export(tiny_export):
    proc = cli("check", str(tiny_export[1]), "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert "CPUExecutionProvider" in proc.stdout and "determinism" in proc.stdout and "check passed" in proc.stdout


def test_cli_check_refuses_a_corrupted_export_in_one_line(tiny_export, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_export[1], bad)
    data = bytearray((bad / "policy.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "policy.onnx").write_bytes(bytes(data))
    broken_manifest = tmp_path / "broken"
    shutil.copytree(tiny_export[1], broken_manifest)
    (broken_manifest / "manifest.json").write_text("{not json")
    cases = ((bad, "sha256"), (broken_manifest, "not valid JSON"), (tmp_path / "nope", "does not exist"))
    for target, fragment in cases:
        proc = cli("check", str(target))
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0] and lines[0].startswith("policy-runtime: error:"), proc.stderr


def test_cli_serve_answers_and_stops_cleanly_on_sigterm(tiny_export, clients):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "policy_runtime.cli", "serve", str(tiny_export[1]), "--bind",
                             f"tcp://127.0.0.1:{port}", "--threads", "1", "--warmup", "1"], env=ENV,
                            stderr=subprocess.PIPE, text=True)
    try:
        client = clients(f"tcp://127.0.0.1:{port}", handshake_timeout_ms=1000, handshake_retries=20)
        assert client.infer(*observation()).actions.shape == (16, 8)
        busy = cli("serve", str(tiny_export[1]), "--bind", f"tcp://127.0.0.1:{port}", "--warmup", "1")
        assert busy.returncode == 2 and busy.stderr.strip().splitlines() == [
            f"policy-runtime: error: cannot bind tcp://127.0.0.1:{port}: address already in use"]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    for fragment in ("loaded", "serving onnxruntime model", "SIGTERM", "stopped"):
        assert fragment in err, err
    assert "Traceback" not in err


def test_cli_serve_on_all_interfaces_needs_insecure_and_says_so_loudly(tiny_export, clients):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "policy_runtime.cli", "serve", str(tiny_export[1]), "--bind",
                             f"tcp://0.0.0.0:{port}", "--insecure", "--threads", "1", "--warmup", "1"], env=ENV,
                            stderr=subprocess.PIPE, text=True)
    try:
        client = clients(f"tcp://127.0.0.1:{port}", handshake_timeout_ms=1000, handshake_retries=20)
        assert client.infer(*observation()).actions.shape == (16, 8)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "WARNING" in err and "INSECURE" in err and "WITHOUT CURVE" in err, err


def test_cli_serve_rejects_bad_key_files_in_one_line(tiny_export, tmp_path):
    (tmp_path / "garbage.key_secret").write_text("nonsense\n")
    (tmp_path / "clients").mkdir()
    proc = cli("serve", str(tiny_export[1]), "--curve-secret", str(tmp_path / "garbage.key_secret"),
               "--curve-clients", str(tmp_path / "clients"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "key" in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_server_errors_surface_as_typed_client_exceptions(backend, serve, clients):
    server = serve(backend)
    client = clients(server.endpoint)
    with pytest.raises(ServerError) as e:
        client.infer({"base_camera": np.zeros((32, 32, 3), np.uint8)}, np.full(18, np.inf, np.float32))
    assert e.value.code == P.NON_FINITE and e.value.request_id is not None
