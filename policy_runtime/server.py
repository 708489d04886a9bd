"""ZeroMQ ROUTER server: many robots, dynamic batching, a structured error for every bad message.

Two threads. The I/O thread owns the ROUTER socket: it answers hello/ping and errors itself (so health
stays visible during a slow inference), checks admission for an observation before decoding it (a client
over its share of the queue gets `overloaded` without the server spending a decode on it), then decodes
and validates it and puts it in a bounded, per-client fair queue. The worker thread takes batches from the
queue round-robin across clients, drops requests whose client deadline has passed or would pass before the
chunk is ready (`expired`, never computed), runs the backend and hands encoded replies back to the I/O
thread over an inproc pipe (ZeroMQ sockets are not thread-safe). Replies to clients that vanished are
dropped by ROUTER. Every received message is released as soon as it is handled.

Other wire protocols (openpi's websocket, `openpi_server.py`) are front ends: each of their connections is a
DEALER on the ROUTER's in-process endpoint, so their requests pass the same admission, decoding, validation,
fair queue, batching and deadlines as a ZeroMQ client's, and the front end only translates messages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import math
import re
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import zmq

from policy_runtime.backends import Backend
from policy_runtime.batching import BatchQueue
from policy_runtime.curve import CurveServerKeys, secure_server
from policy_runtime.errors import UserError
from policy_runtime.metrics import Metrics
from policy_runtime.protocol import (
    BAD_FRAME,
    DEFAULT_ENDPOINT,
    EXPIRED,
    INTERNAL,
    OVERLOADED,
    SHUTTING_DOWN,
    ActionsReply,
    HelloRequest,
    InferRequest,
    Limits,
    PingRequest,
    ProtocolError,
    Timing,
    actions_reply,
    encode,
    error_reply,
    hello_reply,
    pack_ndarray,
    parse_request,
    peek_kind,
    pong_reply,
)

log = logging.getLogger("policy_runtime.server")

DEFAULT_BIND = DEFAULT_ENDPOINT


_TCP = re.compile(r"tcp://(?P<host>.+):(?P<port>[^:\]]+)")
LOOPBACK_HOSTS = ("localhost", "::1", "[::1]")


def parse_endpoint(endpoint: str) -> tuple[str, str]:
    """(transport, address) of a bindable endpoint; a bad one is a UserError (libzmq would bind somewhere else).

    libzmq takes `tcp://127.0.0.1:99999` and binds a random port, so the port is checked here.
    """
    transport, sep, address = endpoint.partition("://")
    if not sep or transport not in ("tcp", "ipc", "inproc") or not address:
        raise UserError(f"endpoint {endpoint!r} is not tcp://HOST:PORT, ipc://PATH or inproc://NAME")
    if transport == "tcp":
        m = _TCP.fullmatch(endpoint)
        port = m["port"] if m else ""
        if not m or not (port == "*" or (port.isdigit() and int(port) <= 65535)):
            raise UserError(f"endpoint {endpoint!r}: the port must be a number in 0..65535 or *")
    return transport, address


def is_loopback_host(host: str) -> bool:
    """True for a host name or address only this machine can reach."""
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def is_loopback(endpoint: str) -> bool:
    """True when only this machine can connect (loopback TCP, ipc, inproc)."""
    transport, address = parse_endpoint(endpoint)
    if transport != "tcp":
        return True
    return is_loopback_host(address.rsplit(":", 1)[0].rsplit(";", 1)[-1])


def check_exposure(endpoint: str, curve: bool, insecure: bool) -> None:
    """A non-loopback bind without CURVE lets anyone on the network drive the robot's policy: refused unless
    the operator says --insecure."""
    if not curve and not insecure and not is_loopback(endpoint):
        raise UserError(f"refusing to serve {endpoint} without CURVE: anyone on the network could send "
                        "observations; use --curve-secret/--curve-clients, bind 127.0.0.1, or pass --insecure")


def probe_bind(endpoint: str) -> None:
    """Fail fast (before a model load that may take minutes) when the endpoint cannot be bound."""
    parse_endpoint(endpoint)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as e:
        why = "address already in use" if e.errno == errno.EADDRINUSE else str(e)
        raise UserError(f"cannot bind {endpoint}: {why}") from None
    finally:
        sock.close(linger=0)
        ctx.term()


class FrontEnd(Protocol):
    """Another protocol served beside ZeroMQ, through the server's in-process endpoint."""

    def start(self) -> str:
        """Bind and serve (errors are UserErrors); returns where clients connect."""
        ...

    def stop(self) -> None:
        """Close connections and wait for them; called before the server's sockets close."""
        ...


@dataclass(frozen=True)
class ServerConfig:
    bind: str | None = DEFAULT_BIND  # None: no ZeroMQ endpoint, only front ends (the in-process endpoint)
    max_batch: int = 8
    max_wait_ms: float = 2.0        # how long the oldest queued request may wait for others to join its batch
    max_queue: int = 32             # pending observations; beyond this, `overloaded`
    max_per_client: int = 4         # pending observations of one client (ZeroMQ identity): its share of the queue
    limits: Limits = Limits()
    curve: CurveServerKeys | None = None
    rcvhwm: int = 100               # ZeroMQ per-peer receive queue (messages)
    heartbeat_ms: int = 1000        # ZMTP heartbeats so dead peers are noticed
    stats_interval_s: float = 10.0  # progress log period (only when something was served)
    insecure: bool = False          # allow a non-loopback bind without CURVE (logged loudly)


ACTIVE_WINDOW_S = 1.0  # a client that sent an observation this recently may send another one into a batch


@dataclass
class _Pending:
    envelope: list[bytes]
    request: InferRequest
    t_recv: float    # wall clock, for the reply
    t_mono: float    # perf_counter at receipt, for durations
    decode_ms: float
    deadline: float  # perf_counter after which the client no longer waits (receipt + timeout_ms)


class PolicyServer:
    """Serve one backend. start() binds (errors surface here); run() loops until request_stop()."""

    def __init__(self, backend: Backend, config: ServerConfig = ServerConfig()):
        if config.max_batch < 1 or config.max_queue < 1 or config.max_per_client < 1 or config.max_wait_ms < 0:
            raise UserError("max batch, max queue and max per client must be >= 1 and max wait >= 0")
        self.backend, self.config = backend, config
        self.instance = secrets.token_hex(8)
        self.contract = dataclasses.replace(backend.contract(), max_batch=config.max_batch,
                                            max_array_bytes=config.limits.max_array_bytes, instance=self.instance)
        self.metrics = Metrics()
        self.queue: BatchQueue[_Pending] = BatchQueue(config.max_queue, config.max_per_client)
        self.endpoint = ""
        self.local_endpoint = f"inproc://policy-{self.instance}"  # where front ends' connections join
        self.front_ends: list[FrontEnd] = []
        self._stop = threading.Event()
        self._ctx: zmq.Context | None = None
        self._threads: list[threading.Thread] = []
        self._auth = None
        self._last_infer: dict[bytes, float] = {}  # client identity -> its last hello or observation
        self._infer_s = 0.0  # recent inference time per batch (moving average), to foresee missed deadlines

    # ----- lifecycle ----------------------------------------------------------------------------------------------
    @property
    def context(self) -> zmq.Context:
        """The ZeroMQ context of the in-process endpoint (front ends make their sockets in it); after start()."""
        assert self._ctx is not None, "start() first"
        return self._ctx

    def start(self) -> str:
        """Bind the sockets, start the worker and the front ends; returns the ZeroMQ endpoint (port 0 / '*': the one
        bound), or the in-process endpoint without a ZeroMQ bind (config.bind None).
        """
        if self.config.bind is not None:
            parse_endpoint(self.config.bind)
            check_exposure(self.config.bind, self.config.curve is not None, self.config.insecure)
        ctx = self._ctx = zmq.Context()
        self.router = ctx.socket(zmq.ROUTER)
        self.router.linger = 0
        self.router.rcvhwm = self.config.rcvhwm
        # libzmq buffers a whole multipart message before handing it over; it can only cap each frame, and a
        # peer sending a larger frame is disconnected before the frame is allocated.
        self.router.setsockopt(zmq.MAXMSGSIZE, self.config.limits.max_message_bytes)
        self.router.setsockopt(zmq.HEARTBEAT_IVL, self.config.heartbeat_ms)
        self.router.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * self.config.heartbeat_ms)
        try:
            if self.config.curve is not None:
                self._auth = secure_server(ctx, self.router, self.config.curve)
            self.router.bind(self.local_endpoint)  # never authenticated by CURVE: in-process only
            if self.config.bind is not None:
                self.router.bind(self.config.bind)
        except zmq.ZMQError as e:
            self._close_all()
            why = "address already in use" if e.errno == errno.EADDRINUSE else str(e)
            raise UserError(f"cannot bind {self.config.bind}: {why}") from None
        except UserError:
            self._close_all()
            raise
        self.endpoint = self.router.getsockopt(zmq.LAST_ENDPOINT).decode()
        pipe = f"inproc://replies-{self.instance}"
        self._pipe_in = ctx.socket(zmq.PAIR)
        self._pipe_in.linger = 0
        self._pipe_in.bind(pipe)
        self._pipe_out = ctx.socket(zmq.PAIR)
        self._pipe_out.linger = 0
        self._pipe_out.connect(pipe)
        worker = threading.Thread(target=self._worker, name="policy-worker", daemon=True)
        worker.start()
        self._threads.append(worker)
        try:
            for front_end in self.front_ends:
                front_end.start()
        except BaseException:
            self._stop.set()
            self._shutdown()
            raise
        log.info("serving %s model %s (%s on %s) at %s: horizon %d, action dim %d, cameras %s, batch <= %d, "
                 "wait <= %.1f ms, queue <= %d (<= %d per client)%s", self.contract.backend,
                 self.contract.model_sha256[:12], self.contract.task or "task ?", self.contract.provider,
                 self.endpoint if self.config.bind is not None else "no ZeroMQ endpoint", self.contract.horizon,
                 self.contract.action_dim, [f"{c.name} {c.height}x{c.width}" for c in self.contract.cameras],
                 self.config.max_batch, self.config.max_wait_ms, self.config.max_queue, self.queue.per_key,
                 ", CURVE on" if self.config.curve else "")
        if self.config.curve is None and self.config.bind is not None and not is_loopback(self.endpoint):
            log.warning("INSECURE: %s is reachable from the network WITHOUT CURVE: anyone who can connect can "
                        "send observations and receive this robot's actions (--insecure was given)", self.endpoint)
        return self.endpoint

    def start_background(self) -> str:
        """start() and run() in a daemon thread (tests, embedding)."""
        endpoint = self.start()
        io = threading.Thread(target=self.run, name="policy-io", daemon=True)
        io.start()
        self._threads.append(io)
        return endpoint

    def request_stop(self) -> None:
        """Safe from signal handlers and other threads: the I/O loop notices within 100 ms."""
        self._stop.set()

    def stop(self, timeout: float = 5.0) -> None:
        self.request_stop()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout)

    # ----- I/O thread ---------------------------------------------------------------------------------------------
    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self._pipe_in, zmq.POLLIN)
        next_stats, last_served = time.monotonic() + self.config.stats_interval_s, 0
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(100))
                if self._pipe_in in events:
                    self._forward_replies()
                if self.router in events:
                    for _ in range(256):  # bounded drain, then give replies a turn
                        try:
                            frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._handle(frames)
                        del frames  # an idle loop must not keep the last (possibly huge) message alive
                if time.monotonic() >= next_stats:
                    next_stats = time.monotonic() + self.config.stats_interval_s
                    if self.metrics.served != last_served:
                        last_served = self.metrics.served
                        self._log_stats()
        finally:
            self._shutdown()

    def _handle(self, frames: list[zmq.Frame]) -> None:
        """One received message: [identity, ("" if REQ), header, *attached frames] (attached: protocol 2)."""
        t_recv, t0 = time.time(), time.perf_counter()
        self.metrics.request()
        identity, rest = frames[0].bytes, frames[1:]
        if len(rest) >= 2 and len(rest[0]) == 0:  # a REQ client puts an empty delimiter first; headers are never empty
            envelope, rest = [identity, b""], rest[1:]
        elif rest:
            envelope = [identity]
        else:
            self._send_error([identity], BAD_FRAME, "expected a header frame after the identity, got none")
            return
        kind, rid = peek_kind(rest[0].buffer)
        if kind not in ("hello", "ping") and not self.queue.admits(identity):
            self._refuse(envelope, rid)  # before decoding: a flood costs a peek per message, not a decode
            return
        try:
            req = parse_request(rest[0].buffer, self.contract, self.config.limits, [f.buffer for f in rest[1:]])
        except ProtocolError as e:
            self._send_error(envelope, e.code, e.message, e.request_id)
            return
        if isinstance(req, HelloRequest):
            log.info("hello from %s (client %r)", identity.hex()[:10], req.client[:60])
            self._last_infer[identity] = time.monotonic()  # a fresh client is about to send observations
            self._send(envelope, hello_reply(req.request_id, self.contract))
        elif isinstance(req, PingRequest):
            self._send(envelope, pong_reply(req.request_id, self.instance, self.health()))
        else:
            self._last_infer[identity] = time.monotonic()
            deadline = t0 + req.timeout_ms / 1e3 if req.timeout_ms is not None else math.inf
            pending = _Pending(envelope, req, t_recv, t0, (time.perf_counter() - t0) * 1e3, deadline)
            accepted, displaced = self.queue.offer(identity, pending)
            if displaced is not None:
                self._refuse(displaced.envelope, displaced.request.request_id, displaced=True)
            if not accepted:
                self._refuse(envelope, req.request_id)

    def _refuse(self, envelope: list[bytes], request_id: int | None, displaced: bool = False) -> None:
        """`overloaded`, saying whether this client is over its own share or the whole queue is full."""
        if displaced:
            why = "your request was displaced by a client with fewer pending requests (fair share)"
        elif self.queue.pending(envelope[0]) >= self.queue.per_key:
            why = f"this client already has {self.queue.per_key} requests pending (its share of the queue)"
        else:
            why = f"{self.config.max_queue} requests already pending"
        self._send_error(envelope, OVERLOADED, f"{why}; send a fresh observation later", request_id)

    def _active_clients(self) -> int:
        """Clients that said hello or sent an observation within the last ACTIVE_WINDOW_S (at least 1)."""
        horizon = time.monotonic() - ACTIVE_WINDOW_S
        for ident in [i for i, t in list(self._last_infer.items()) if t < horizon]:
            self._last_infer.pop(ident, None)
        return max(1, len(self._last_infer))

    def _send(self, envelope: list[bytes], message: dict) -> None:
        # A full peer queue (it stopped reading) drops the reply, as ROUTER does for vanished peers.
        with contextlib.suppress(zmq.Again):
            self.router.send_multipart([*envelope, encode(message)], zmq.NOBLOCK)

    def _send_error(self, envelope: list[bytes], code: str, message: str, request_id: int | None = None) -> None:
        self.metrics.error(code)
        if code not in (OVERLOADED,):
            log.debug("error %s to %s: %s", code, envelope[0].hex()[:10], message)
        self._send(envelope, error_reply(code, message, request_id))

    def _forward_replies(self) -> None:
        while True:
            try:
                frames = self._pipe_in.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            with contextlib.suppress(zmq.Again):
                self.router.send_multipart(frames, zmq.NOBLOCK)

    def health(self) -> dict:
        h = self.metrics.health(queue_depth=len(self.queue))
        h.update(provider=self.contract.provider, backend=self.contract.backend, max_batch=self.config.max_batch,
                 max_per_client=self.queue.per_key)
        return h

    def _log_stats(self) -> None:
        h = self.health()
        lat = h["latency_ms"]
        log.info("served %d chunks in %d batches (p50 %s ms, p99 %s ms), %d errors, queue %d", h["served"],
                 h["batches"], lat.get("p50", "-"), lat.get("p99", "-"), h["errors"], h["queue_depth"])

    def _shutdown(self) -> None:
        for front_end in self.front_ends:  # their connections' sockets must close before the context ends
            front_end.stop()
        for p in self.queue.close():
            self._send_error(p.envelope, SHUTTING_DOWN, "the server is shutting down", p.request.request_id)
        for t in self._threads:
            if t.name == "policy-worker":
                t.join(10.0)
        self._forward_replies()  # whatever the worker finished last
        h = self.health()
        log.info("stopped %s: %d requests, %d chunks served, %d errors", self.endpoint, h["requests"], h["served"],
                 h["errors"])
        self._close_all()

    def _close_all(self) -> None:
        for name in ("router", "_pipe_in"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    # ----- worker thread ------------------------------------------------------------------------------------------
    def _worker(self) -> None:
        try:
            while True:
                batch = self.queue.take(self.config.max_batch, self.config.max_wait_ms / 1e3, self._active_clients)
                if batch is None:
                    return
                self._run_batch(batch)
                del batch  # release the requests' frames now, not when the next batch arrives
        finally:
            self._pipe_out.close(linger=0)

    def _reply(self, envelope: list[bytes], message: dict) -> None:
        self._pipe_out.send_multipart([*envelope, encode(message)])

    def _worker_error(self, p: _Pending, code: str, message: str) -> None:
        self.metrics.error(code)
        self._reply(p.envelope, error_reply(code, message, p.request.request_id))

    def _late(self, p: _Pending, now: float) -> bool:
        """Would the reply miss the client's deadline? Then computing it only delays everyone else.

        Past the deadline: late. Otherwise late when the recent inference time does not fit in what is left,
        but only for a request that already waited at least that long: its own wait shows the server is that
        slow now, so one slow batch in the past never makes a fresh request on an idle server refused.
        """
        if now > p.deadline:
            return True
        return now - p.t_mono >= self._infer_s and now + self._infer_s > p.deadline

    def _run_batch(self, batch: list[_Pending]) -> None:
        t_start = time.perf_counter()
        live = []
        for p in batch:
            if self._late(p, t_start):
                waited = (t_start - p.t_mono) * 1e3
                self._worker_error(p, EXPIRED, f"waited {waited:.1f} ms + inference ~{self._infer_s * 1e3:.1f} ms "
                                   f"> timeout_ms {p.request.timeout_ms}")
            else:
                live.append(p)
        if not live:
            return
        t_infer = time.perf_counter()
        try:
            results = self.backend.infer_batch([p.request for p in live])
            if len(results) != len(live):
                raise RuntimeError(f"backend returned {len(results)} chunks for {len(live)} requests")
        except Exception as e:
            log.exception("inference failed for a batch of %d", len(live))
            for p in live:
                self._worker_error(p, INTERNAL, f"inference failed: {type(e).__name__}: {str(e)[:200]}")
            return
        infer_ms = (time.perf_counter() - t_infer) * 1e3
        self._infer_s = infer_ms / 1e3 if not self._infer_s else 0.7 * self._infer_s + 0.3 * infer_ms / 1e3
        self.metrics.batch(len(live))
        for p, res in zip(live, results, strict=True):
            if res.error is not None or res.actions is None:
                code, message = res.error or (INTERNAL, "no actions")
                self._worker_error(p, code, message)
                continue
            t_enc = time.perf_counter()
            packed = pack_ndarray(res.actions)
            timing = Timing(queue_ms=(t_start - p.t_mono) * 1e3 - p.decode_ms, decode_ms=p.decode_ms,
                            infer_ms=infer_ms, encode_ms=(time.perf_counter() - t_enc) * 1e3, t_recv=p.t_recv,
                            t_send=time.time(), batch_size=len(live))
            reply = ActionsReply(p.request.request_id, res.actions, self.instance, p.request.t_capture,
                                 self.contract.clip_actions, res.clipped_values, timing, p.request.delay_steps,
                                 res.rtc_applied)
            payload = encode(actions_reply(reply, packed))
            self.metrics.served_one((time.perf_counter() - p.t_mono) * 1e3)  # counted before the client can ping
            self._pipe_out.send_multipart([*p.envelope, payload])
