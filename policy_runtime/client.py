"""Reliable client for the policy server (what the ROS 2 node uses): timeouts, reconnects, contract checks.

DEALER socket, one request in flight. Every request has an id; replies with another id (answers to requests
that already timed out) are dropped. On a timeout the socket is closed with linger 0 and the next call opens
a fresh one and re-handshakes (lazy pirate). An observation is never re-sent automatically: after a timeout
the caller should send a fresh one. The handshake checks the server's contract against what the robot
expects, and a reply from a restarted server (new instance id) triggers a new handshake before it is used.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import zmq

from policy_runtime.curve import CurveClientKeys, secure_client
from policy_runtime.protocol import (
    DEFAULT_ENDPOINT,
    PROTOCOL_VERSION,
    ActionsReply,
    Contract,
    ErrorReply,
    HelloReply,
    Limits,
    PongReply,
    ProtocolError,
    encode_frames,
    hello_request,
    infer_request,
    parse_reply,
    ping_request,
)

log = logging.getLogger("policy_runtime.client")


class ClientError(Exception):
    """Base of everything the client raises."""


class Timeout(ClientError):
    """No reply in time; the socket was reset and the next call reconnects."""


class ServerError(ClientError):
    """The server answered with a structured error."""

    def __init__(self, code: str, message: str, request_id: int | None):
        super().__init__(f"server error {code}: {message}")
        self.code, self.message, self.request_id = code, message, request_id


class BadReply(ClientError):
    """The server's reply breaks the wire format (wrong server, or a version skew)."""


class ContractMismatch(ClientError):
    """The server's model does not fit this robot; `mismatches` holds one line per difference."""

    def __init__(self, mismatches: list[str]):
        super().__init__("policy server contract does not match this robot:\n" + "\n".join(mismatches))
        self.mismatches = mismatches


@dataclass(frozen=True)
class Expectation:
    """What the robot side was configured for; None fields are not checked."""

    horizon: int | None = None
    exec_steps: int | None = None
    action_dim: int | None = None
    cameras: dict[str, tuple[int, int]] | None = None  # name -> (height, width)
    state_dim: int | None = None
    normalisation_sha256: str | None = None
    control_mode: str | None = None
    control_hz: float | None = None
    model_sha256: str | None = None

    def mismatches(self, c: Contract) -> list[str]:
        out = []
        if c.protocol != PROTOCOL_VERSION:
            out.append(f"protocol: server speaks {c.protocol}, this client {PROTOCOL_VERSION}")
        for name in ("horizon", "exec_steps", "action_dim", "state_dim", "control_mode", "control_hz"):
            want, got = getattr(self, name), getattr(c, name)
            if want is not None and want != got:
                out.append(f"{name}: robot expects {want}, server has {got}")
        for name in ("normalisation_sha256", "model_sha256"):
            want, got = getattr(self, name), getattr(c, name)
            if want is not None and want != got:
                out.append(f"{name}: robot expects {want[:16]}..., server has {got[:16]}...")
        if self.cameras is not None:
            served = {cam.name: (cam.height, cam.width) for cam in c.cameras}
            for name, hw in self.cameras.items():
                if name not in served:
                    out.append(f"camera {name}: robot has it, the model does not use it (model: {sorted(served)})")
                elif tuple(hw) != served[name]:
                    out.append(f"camera {name}: robot sends {hw[0]}x{hw[1]}, model needs "
                               f"{served[name][0]}x{served[name][1]}")
            out += [f"camera {name}: model needs it, robot does not have it" for name in served
                    if name not in self.cameras]
        return out


@dataclass
class ClientStats:
    requests: int = 0
    timeouts: int = 0
    reconnects: int = 0
    handshakes: int = 0
    stale_dropped: int = 0
    server_restarts: int = 0


@dataclass
class PolicyClient:
    """Synchronous client; not thread-safe (one per control loop)."""

    endpoint: str = DEFAULT_ENDPOINT
    timeout_ms: float = 1000.0           # per infer/ping request
    handshake_timeout_ms: float = 1000.0
    handshake_retries: int = 3
    expect: Expectation = field(default_factory=Expectation)
    curve: CurveClientKeys | None = None
    limits: Limits = field(default_factory=Limits)
    name: str = "policy_runtime.client"
    stats: ClientStats = field(default_factory=ClientStats)

    def __post_init__(self) -> None:
        self._ctx = zmq.Context()
        self._sock: zmq.Socket | None = None
        self._contract: Contract | None = None
        self._next_id = secrets.randbits(32)
        self._opened = 0

    # ----- public API ---------------------------------------------------------------------------------------------
    @property
    def contract(self) -> Contract | None:
        return self._contract

    def connect(self) -> Contract:
        """Handshake now (otherwise the first request does it); raises Timeout or ContractMismatch."""
        if self._contract is None or self._sock is None:
            self._handshake()
        assert self._contract is not None
        return self._contract

    def infer(self, images: dict[str, np.ndarray], state: np.ndarray, *, t_capture: float | None = None,
              instruction: str | None = None, noise_seed: int | None = None, prev_chunk: np.ndarray | None = None,
              delay_steps: int | None = None, timeout_ms: float | None = None) -> ActionsReply:
        """One action chunk for one observation; raises Timeout, ServerError, ContractMismatch or BadReply."""
        contract = self.connect()
        timeout = self.timeout_ms if timeout_ms is None else timeout_ms
        rid = self._new_id()
        msg = infer_request(rid, images, np.asarray(state, np.float32),
                            time.time() if t_capture is None else t_capture, instruction, noise_seed, prev_chunk,
                            delay_steps, timeout_ms=timeout)
        reply = self._exchange(msg, rid, timeout)
        if isinstance(reply, ErrorReply):
            raise ServerError(reply.code, reply.message, reply.request_id)
        if not isinstance(reply, ActionsReply):
            raise BadReply(f"expected an actions reply, got {type(reply).__name__}")
        if reply.instance != contract.instance:
            self._server_restarted()
            contract = self.connect()
        if reply.actions.shape != (contract.horizon, contract.action_dim):
            raise BadReply(f"chunk shape {reply.actions.shape} != contract ({contract.horizon}, {contract.action_dim})")
        return reply

    def ping(self, timeout_ms: float | None = None) -> dict:
        """Server health (uptime, counts, latency percentiles)."""
        self.connect()
        rid = self._new_id()
        reply = self._exchange(ping_request(rid), rid, self.timeout_ms if timeout_ms is None else timeout_ms)
        if isinstance(reply, ErrorReply):
            raise ServerError(reply.code, reply.message, reply.request_id)
        if not isinstance(reply, PongReply):
            raise BadReply(f"expected a pong reply, got {type(reply).__name__}")
        if self._contract is not None and reply.instance != self._contract.instance:
            self._server_restarted()
        return reply.health

    def wait_until_up(self, timeout_s: float, alive: Callable[[], bool] | None = None) -> dict:
        """Ping until a starting server answers (no handshake, nothing logged per try); returns its health.

        For a launcher that has just started the server: it may still be loading the model, which is not a
        fault worth a warning. Raises Timeout after `timeout_s`, ClientError when `alive()` turns false.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            rid = self._new_id()
            try:
                reply = self._exchange(ping_request(rid), rid, self.timeout_ms)
            except Timeout:
                if alive is not None and not alive():
                    raise ClientError(f"policy server at {self.endpoint} stopped before it answered") from None
                if time.monotonic() >= deadline:
                    raise Timeout(f"policy server at {self.endpoint} did not answer within {timeout_s:.0f} s") from None
                continue
            if isinstance(reply, ErrorReply):
                raise ServerError(reply.code, reply.message, reply.request_id)
            if not isinstance(reply, PongReply):
                raise BadReply(f"expected a pong reply, got {type(reply).__name__}")
            return reply.health

    def close(self) -> None:
        self._reset()
        self._ctx.term()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- internals ----------------------------------------------------------------------------------------------
    def _new_id(self) -> int:
        self._next_id = (self._next_id + 1) % (1 << 64)
        return self._next_id

    def _open(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.linger = 0
        # A reply frame over the cap (a hostile or broken server) is dropped by libzmq before it is allocated.
        sock.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes)
        if self.curve is not None:
            secure_client(sock, self.curve)
        sock.connect(self.endpoint)
        self._sock = sock
        self._opened += 1
        self.stats.reconnects = self._opened - 1
        return sock

    def _reset(self) -> None:
        """Lazy pirate: drop the socket (and anything queued in it); the next call opens a new one."""
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def _server_restarted(self) -> None:
        log.warning("policy server at %s restarted; re-checking its contract", self.endpoint)
        self.stats.server_restarts += 1
        self._contract = None

    def _handshake(self) -> None:
        for attempt in range(1, self.handshake_retries + 1):
            if self._sock is None:
                self._open()
            rid = self._new_id()
            try:
                reply = self._exchange(hello_request(rid, self.name), rid, self.handshake_timeout_ms)
            except Timeout:
                log.warning("no handshake reply from %s (attempt %d/%d)", self.endpoint, attempt,
                            self.handshake_retries)
                continue
            if isinstance(reply, ErrorReply):
                raise ServerError(reply.code, reply.message, reply.request_id)
            if not isinstance(reply, HelloReply):
                raise BadReply(f"expected a hello reply, got {type(reply).__name__}")
            problems = self.expect.mismatches(reply.contract)
            if problems:
                self._reset()
                raise ContractMismatch(problems)
            self._contract = reply.contract
            self.stats.handshakes += 1
            return
        raise Timeout(f"policy server at {self.endpoint} did not answer the handshake ({self.handshake_retries} "
                      f"attempts of {self.handshake_timeout_ms:.0f} ms)")

    def _exchange(self, msg: dict, rid: int, timeout_ms: float) -> HelloReply | ActionsReply | PongReply | ErrorReply:
        sock = self._sock if self._sock is not None else self._open()
        self.stats.requests += 1
        deadline = time.monotonic() + timeout_ms / 1e3
        try:
            # Images go as attached frames without a copy; infer() holds them until the reply or the timeout.
            sock.send_multipart(encode_frames(msg), zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self._timed_out()
            raise Timeout(f"cannot send to {self.endpoint} (send queue full)") from None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(max(1, int(remaining * 1e3)), zmq.POLLIN):
                if time.monotonic() < deadline:
                    continue
                self._timed_out()
                raise Timeout(f"no reply from {self.endpoint} within {timeout_ms:.0f} ms")
            header, *attached = sock.recv_multipart()
            try:
                reply = parse_reply(header, self.limits, attached)
            except ProtocolError as e:
                raise BadReply(f"unreadable reply from {self.endpoint}: {e}") from None
            if reply.request_id is not None and reply.request_id != rid:
                self.stats.stale_dropped += 1  # the answer to a request we already gave up on
                continue
            return reply

    def _timed_out(self) -> None:
        self.stats.timeouts += 1
        self._reset()
        self._contract = None
