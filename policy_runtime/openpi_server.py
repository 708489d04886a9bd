"""openpi's websocket protocol in front of the policy server, so an openpi robot script drives our exports unchanged.

The protocol (what `openpi_client.WebsocketClientPolicy` speaks): on connect the server sends one binary
message with its metadata; then, strictly in turn, the client sends one binary observation and receives one
binary reply `{"actions": float32 [H, A], "server_timing": {...}}`, everything in openpi's msgpack encoding
(openpi_wire.py). An error is a text frame with the message, then the close code 1011. `GET /healthz` answers
200. With an API key configured, a connection must send `Authorization: Api-Key <key>`.

Each websocket connection is one client of the PolicyServer: its handler thread owns a DEALER socket on the
server's in-process endpoint, converts the observation with the key map (openpi_map.py) into our `infer`
request and the reply back. Admission, per-client fair share, validation, batching and every error code are
the server's own; this module only translates.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus

import zmq
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.sync.server import Server, ServerConnection, serve

from policy_runtime.errors import UserError
from policy_runtime.openpi_map import OpenpiMap
from policy_runtime.openpi_wire import packb, unpackb
from policy_runtime.protocol import (
    BAD_MESSAGE,
    SHUTTING_DOWN,
    ActionsReply,
    ErrorReply,
    ProtocolError,
    encode_frames,
    infer_request,
    parse_reply,
)
from policy_runtime.server import PolicyServer, is_loopback_host

log = logging.getLogger("policy_runtime.openpi")
ws_log = logging.getLogger("policy_runtime.openpi.websockets")  # the library's own lines: warnings and up unless -v

API_KEY_ENV = "POLICY_RUNTIME_OPENPI_API_KEY"
HEALTH_PATH = "/healthz"
POLL_MS = 100  # how often a connection waiting for its chunk checks whether the server is stopping
RECV_QUEUE = 2  # frames a connection buffers before it stops reading its socket (lockstep clients send one)


@dataclass(frozen=True)
class OpenpiConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    insecure: bool = False
    max_connections: int = 64  # each connection is a thread and a socket


def check_openpi_exposure(host: str, api_key: str | None, insecure: bool) -> None:
    """The ZeroMQ rule for the websocket: off loopback only with an API key, or when the operator says --insecure."""
    if not is_loopback_host(host) and api_key is None and not insecure:
        raise UserError(f"refusing to serve openpi clients on {host} without an API key: anyone on the network could "
                        f"send observations; set {API_KEY_ENV} (or --openpi-api-key), use --openpi-host 127.0.0.1, "
                        "or pass --insecure")


def probe_port(host: str, port: int) -> None:
    """Fail fast (before a model load that may take minutes) when host:port cannot be bound."""
    try:
        socket.create_server((host, port)).close()
    except OSError as e:
        raise _bind_error(host, port, e) from None


def _bind_error(host: str, port: int, e: OSError) -> UserError:
    return UserError(f"cannot bind openpi port {host}:{port}: {e.strerror or e}")


class _Refused(Exception):
    """Ends a connection with openpi's error: the text, then close code 1011."""


class OpenpiServer:
    """The websocket front end of one PolicyServer: made before server.start(), which starts and stops it too."""

    def __init__(self, server: PolicyServer, key_map: OpenpiMap, config: OpenpiConfig = OpenpiConfig()):
        self.server, self.map, self.config = server, key_map.check(server.contract), config
        self.url = ""
        self._ws: Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        server.front_ends.append(self)

    # ----- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> str:
        cfg, limits = self.config, self.server.config.limits
        check_openpi_exposure(cfg.host, cfg.api_key, cfg.insecure)
        if ws_log.level == logging.NOTSET and not log.isEnabledFor(logging.DEBUG):
            ws_log.setLevel(logging.WARNING)
        self.metadata = packb({**self.server.contract.to_wire(), "openpi_map": self.map.to_dict()})
        try:
            self._ws = serve(self._handle, cfg.host, cfg.port, compression=None, max_size=limits.max_message_bytes,
                             max_queue=RECV_QUEUE, process_request=self._admit, logger=ws_log)
        except OSError as e:
            raise _bind_error(cfg.host, cfg.port, e) from None
        host, port = self._ws.socket.getsockname()[:2]
        self.url = f"ws://{host}:{port}"
        self._thread = threading.Thread(target=self._ws.serve_forever, name="openpi-accept", daemon=True)
        self._thread.start()
        log.info("serving openpi clients at %s (%s, map: %s)", self.url,
                 "API key required" if cfg.api_key else "no API key", self.map.source)
        if not is_loopback_host(cfg.host) and cfg.api_key is None:
            log.warning("INSECURE: %s is reachable from the network WITHOUT an API key: anyone who can connect can "
                        "send observations and receive this robot's actions (--insecure was given)", self.url)
        elif not is_loopback_host(cfg.host):
            log.warning("%s is reachable from the network; the API key travels unencrypted over ws:// (use a VPN or "
                        "an encrypting tunnel between robot and server)", self.url)
        return self.url

    def stop(self) -> None:
        """Close every connection (1001) and wait for the handlers; safe to call twice or before start()."""
        self._stopping.set()
        if self._ws is not None:
            self._ws.shutdown()
            self._ws = None
        if self._thread is not None:
            self._thread.join(5.0)

    # ----- HTTP stage: health, API key, connection cap ------------------------------------------------------------
    def _admit(self, connection: ServerConnection, request):
        if request.path == HEALTH_PATH:
            return connection.respond(HTTPStatus.OK, "OK\n")
        if self.config.api_key is not None and not self._authorized(request.headers.get_all("Authorization")):
            log.warning("refused an openpi connection from %s: missing or wrong API key", _peer(connection))
            return connection.respond(HTTPStatus.UNAUTHORIZED, "missing or wrong API key (Authorization: Api-Key)\n")
        if self._ws is not None and len(self._ws.connections) >= self.config.max_connections:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE,
                                      f"{self.config.max_connections} openpi connections already open\n")
        return None

    def _authorized(self, values: list[str]) -> bool:
        """Exactly one `Authorization: Api-Key <key>` header with the configured key (compared in constant time)."""
        expected = f"Api-Key {self.config.api_key}".encode()
        return len(values) == 1 and secrets.compare_digest(values[0].encode("utf-8", "surrogateescape"), expected)

    # ----- one connection (its own thread) ------------------------------------------------------------------------
    def _handle(self, ws: ServerConnection) -> None:
        peer = _peer(ws)  # now: the socket is gone by the time the handler ends
        sock = self.server.context.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(self.server.local_endpoint)
        log.info("openpi client %s connected", peer)
        try:
            ws.send(self.metadata)
            prev_total_ms = None
            for rid in itertools.count(1):
                message = ws.recv()
                t0 = time.perf_counter()
                reply = self._infer(sock, rid, message)
                timing = reply.timing
                server_timing = {"infer_ms": timing.infer_ms, "queue_ms": timing.queue_ms,
                                 "batch_size": timing.batch_size}
                if prev_total_ms is not None:
                    server_timing["prev_total_ms"] = prev_total_ms
                ws.send(packb({"actions": reply.actions, "server_timing": server_timing}))
                prev_total_ms = (time.perf_counter() - t0) * 1e3
        except ConnectionClosed:
            pass  # the client left (or the server is stopping): nothing to answer
        except _Refused as e:
            self._refuse(ws, str(e))
        finally:
            sock.close(linger=0)
            log.info("openpi client %s disconnected", peer)

    def _infer(self, sock: zmq.Socket, rid: int, message: bytes | str) -> ActionsReply:
        """One observation through the policy server; any error is _Refused with the server's code and message."""
        try:
            if isinstance(message, str):
                raise ProtocolError(BAD_MESSAGE, "observations are binary msgpack messages, not text")
            obs = unpackb(message, self.server.config.limits)
            images, state, instruction = self.map.convert(obs, self.server.contract)
        except ProtocolError as e:
            self.server.metrics.request()  # counted like the server's own refusals
            self.server.metrics.error(e.code)
            raise _Refused(f"{e.code}: {e.message}") from None
        sock.send_multipart(encode_frames(infer_request(rid, images, state, time.time(), instruction)), copy=False)
        while not sock.poll(POLL_MS):
            if self._stopping.is_set():
                raise _Refused(f"{SHUTTING_DOWN}: the server is shutting down")
        header, *attached = sock.recv_multipart(copy=False)
        reply = parse_reply(header.buffer, attached=[f.buffer for f in attached])
        if isinstance(reply, ErrorReply):
            raise _Refused(f"{reply.code}: {reply.message}")
        if not isinstance(reply, ActionsReply) or reply.request_id != rid:
            raise _Refused(f"internal: unexpected reply {type(reply).__name__}")
        return reply

    @staticmethod
    def _refuse(ws: ServerConnection, text: str) -> None:
        """openpi's error path: the message as a text frame, then close 1011 (the client raises on a text frame)."""
        try:
            ws.send(text)
            ws.close(CloseCode.INTERNAL_ERROR, text[:100])
        except ConnectionClosed:
            pass


def _peer(connection: ServerConnection) -> object:
    """The client's address, for the log; a client may have disconnected before its handler asks (ENOTCONN)."""
    try:
        return connection.remote_address
    except OSError:
        return "a client that already left"
