"""openpi's websocket protocol served by our PolicyServer, tested with the real `openpi-client` package.

Real sockets (websocket over loopback TCP, ZeroMQ in-process), real ONNX Runtime on the tiny export, the real
`WebsocketClientPolicy` and `ActionChunkBroker` unchanged; raw `websockets` clients for what openpi's client
would never send (malformed, huge, abandoned requests).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from policy_runtime import protocol as P
from policy_runtime.client import PolicyClient
from policy_runtime.errors import UserError
from policy_runtime.openpi_map import OpenpiMap, load_openpi_map
from policy_runtime.openpi_server import OpenpiConfig, OpenpiServer
from policy_runtime.openpi_wire import packb, unpackb
from policy_runtime.protocol import Limits
from policy_runtime.server import PolicyServer, ServerConfig
from tests.bad_input import ENTRY, ROOT, assert_refused_unchanged
from tests.ros_fixtures import free_port, wait_for
from tests.test_runtime_server import backend, tiny_export  # noqa: F401  (fixtures: the real tiny export)

openpi_client = pytest.importorskip("openpi_client", reason="openpi-client not installed (pip install -e '.[dev]')")
from openpi_client import msgpack_numpy  # noqa: E402
from openpi_client.action_chunk_broker import ActionChunkBroker  # noqa: E402
from openpi_client.websocket_client_policy import WebsocketClientPolicy  # noqa: E402

# A LIBERO-style client against the tiny export (camera base_camera 32x32, state agent/qpos 9 + agent/qvel 9).
LIBERO_TINY_MAP = """\
version: 1
images:
  base_camera: observation/image
state:
  agent/qpos:
    - {key: observation/state, slice: [0, 7]}
    - {key: observation/state, slice: [6, 8]}
  agent/qvel: zeros
instruction: prompt
"""


def libero_observation(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"observation/image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
            "observation/wrist_image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
            "observation/state": rng.standard_normal(8).astype(np.float32), "prompt": "pick up the cube"}


@pytest.fixture
def libero_map(tmp_path) -> Path:
    path = tmp_path / "map.yaml"
    path.write_text(LIBERO_TINY_MAP)
    return path


class GateBackend:
    """The real ONNX backend whose first batch waits until the test opens the gate (a slow model, on demand)."""

    def __init__(self, inner):
        self.inner, self.name = inner, inner.name
        self.entered, self.gate = threading.Event(), threading.Event()

    def contract(self) -> P.Contract:
        return self.inner.contract()

    def infer_batch(self, requests):
        self.entered.set()
        self.gate.wait(60)
        return self.inner.infer_batch(requests)

    def close(self) -> None:
        pass


@pytest.fixture
def openpi_serve(libero_map, caplog):
    """Factory: a PolicyServer with an openpi front end on a free loopback port; stopped at teardown, after which
    no connection handler may have failed (the websocket library logs such a failure as an error)."""
    servers: list[PolicyServer] = []

    def start(backend, openpi: OpenpiConfig | None = None, zmq: bool = False, **cfg) -> tuple[PolicyServer, str]:  # noqa: F811
        bind = f"tcp://127.0.0.1:{free_port()}" if zmq else None
        server = PolicyServer(backend, ServerConfig(bind=bind, **cfg))
        front = OpenpiServer(server, load_openpi_map(libero_map), openpi or OpenpiConfig(port=0))
        server.start_background()
        servers.append(server)
        return server, front.url

    yield start
    for s in servers:
        s.stop()
    records = caplog.get_records("call") + caplog.get_records("teardown")
    failed = [r.getMessage() for r in records if r.name.startswith("policy_runtime.openpi") and
              r.levelno >= logging.ERROR]
    assert not failed, failed


def raw_error(url: str, payload: bytes | str) -> tuple[str, int | None]:
    """Send one message on a bare websocket; (the text the server answered, the close code it sent)."""
    with connect(url, compression=None, max_size=None) as ws:
        ws.recv(timeout=30)  # metadata
        ws.send(payload)
        text = ws.recv(timeout=30)
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=30)
        return text, ws.close_code


# ----- the wire encoding ----------------------------------------------------------------------------------------------
def test_our_encoding_is_byte_exact_with_openpi_client():
    obs = {**libero_observation(), "observation/gripper_position": np.float32(0.5), "n": 3, "nested": {"a": [1.5]}}
    reply = {"actions": np.linspace(-1, 1, 128, dtype=np.float32).reshape(16, 8),
             "server_timing": {"infer_ms": 1.25}}
    for value in (obs, reply):
        assert packb(value) == msgpack_numpy.packb(value)
    back = unpackb(msgpack_numpy.packb(obs))
    assert np.array_equal(back["observation/image"], obs["observation/image"]) and back["n"] == 3
    assert back["observation/gripper_position"] == np.float32(0.5) and back["nested"] == {"a": [1.5]}
    assert np.array_equal(msgpack_numpy.unpackb(packb(reply))["actions"], reply["actions"])


@pytest.mark.parametrize("bad, code", [
    (b"\xc1", P.BAD_MSGPACK),
    (msgpack_numpy.packb({"x": {b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": "|O", b"shape": [1]}}),
     P.BAD_ARRAY),
    (msgpack_numpy.packb({"x": {b"__ndarray__": True, b"data": b"\0" * 7, b"dtype": "<f4", b"shape": [2]}}),
     P.BAD_ARRAY),
    (msgpack_numpy.packb({"x": {b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": "<f4", b"shape": "2"}}),
     P.BAD_ARRAY),
    (msgpack_numpy.packb({"x": np.zeros(300, np.float32)}), P.ARRAY_TOO_LARGE),
])
def test_malformed_bytes_are_protocol_errors(bad, code):
    with pytest.raises(P.ProtocolError) as e:
        unpackb(bad, Limits(max_array_bytes=1024))
    assert e.value.code == code


# ----- the key map ----------------------------------------------------------------------------------------------------
def test_map_converts_layout_dtype_size_and_state_parts(backend, libero_map):  # noqa: F811
    contract = backend.contract()
    key_map = load_openpi_map(libero_map).check(contract)
    obs = libero_observation()
    images, state, instruction = key_map.convert(obs, contract)
    frame = images["base_camera"]
    assert frame.shape == (32, 32, 3) and frame.dtype == np.uint8 and instruction == "pick up the cube"
    s = obs["observation/state"]
    assert state.dtype == np.float32 and np.array_equal(state, np.concatenate([s[:7], s[6:8], np.zeros(9)]))
    chw_float = {**obs, "observation/image": np.moveaxis(obs["observation/image"], 2, 0) / 255.0}
    assert np.array_equal(key_map.convert(chw_float, contract)[0]["base_camera"], frame)
    wide = {**obs, "observation/image": np.full((100, 200, 3), 255, np.uint8)}  # padded, not stretched
    padded = key_map.convert(wide, contract)[0]["base_camera"]
    assert padded[0].max() == 0 and padded[-1].max() == 0 and padded[16].min() == 255


def test_default_map_reads_our_names(backend):  # noqa: F811
    contract = backend.contract()
    obs = {"observation/base_camera": np.zeros((32, 32, 3), np.uint8), "observation/state": np.arange(18.0)}
    images, state, instruction = OpenpiMap.default(contract).check(contract).convert(obs, contract)
    assert np.array_equal(state, np.arange(18, dtype=np.float32)) and instruction is None


def test_shipped_example_maps_fit_the_shipped_checkpoint():
    from policy_runtime.contract import PolicySpec

    spec = PolicySpec.from_dict(json.loads((ROOT / "checkpoints/pushcube_rgb_small/config.json").read_text())["spec"])
    contract = P.Contract("0" * 64, "onnx", "cpu", 16, 8, spec.action_dim, 4, spec.control_mode, spec.action_low,
                          spec.action_high, True, spec.cameras, spec.state_dim, spec.state_layout, "0" * 64,
                          spec.control_hz, 48, spec.instruction)
    droid = {"observation/exterior_image_1_left": np.zeros((224, 224, 3), np.uint8),
             "observation/joint_position": np.arange(7.0), "observation/gripper_position": np.array([1.0]),
             "prompt": "push the cube"}
    _, state, _ = load_openpi_map(ROOT / "configs/openpi_map_droid.yaml").check(contract).convert(droid, contract)
    assert np.allclose(state[:9], [0, 1, 2, 3, 4, 5, 6, 0, 0]) and np.allclose(state[18:], [0, 0, 0, 1, 0, 0, 0])
    libero = {"observation/image": np.zeros((224, 224, 3), np.uint8), "observation/state": np.arange(8.0)}
    _, state, _ = load_openpi_map(ROOT / "configs/openpi_map_libero.yaml").check(contract).convert(libero, contract)
    assert np.allclose(state[7:9], [6, 7]) and np.allclose(state[18:], [0, 1, 2, 1, 0, 0, 0])


# ----- the real openpi client -----------------------------------------------------------------------------------------
def test_websocket_client_policy_and_action_chunk_broker_unchanged(backend, openpi_serve):  # noqa: F811
    server, url = openpi_serve(backend)
    client = WebsocketClientPolicy(url)
    meta = client.get_server_metadata()
    assert meta["horizon"] == 16 and meta["action_dim"] == 8 and meta["instance"] == server.instance
    assert meta["openpi_map"]["images"] == {"base_camera": "observation/image"}
    reply = client.infer(libero_observation())
    actions = reply["actions"]
    assert actions.shape == (16, 8) and actions.dtype == np.float32 and np.abs(actions).max() <= 1.0
    assert reply["server_timing"]["batch_size"] == 1 and reply["server_timing"]["infer_ms"] > 0
    assert "prev_total_ms" in client.infer(libero_observation(1))["server_timing"]  # openpi's field, from the 2nd on
    broker = ActionChunkBroker(client, action_horizon=8)
    steps = [broker.infer(libero_observation(i))["actions"] for i in range(20)]
    assert all(a.shape == (8,) for a in steps)
    assert server.metrics.served == 2 + 3  # 20 steps of 8-step chunks: three inferences
    client._ws.close()


def test_openpi_and_zeromq_clients_share_one_batch(backend, openpi_serve):  # noqa: F811
    gated = GateBackend(backend)
    server, url = openpi_serve(gated, zmq=True, max_batch=4, max_wait_ms=0.0)
    first = WebsocketClientPolicy(url)
    results: dict[str, object] = {}
    threads = [threading.Thread(target=lambda: results.update(first=first.infer(libero_observation())))]
    threads[0].start()
    wait_for(gated.entered.is_set, 60, "the first batch to reach the model")
    second = WebsocketClientPolicy(url)
    ours = PolicyClient(server.endpoint, timeout_ms=60000)
    images, state = {"base_camera": np.zeros((32, 32, 3), np.uint8)}, np.zeros(18, np.float32)
    threads += [threading.Thread(target=lambda: results.update(second=second.infer(libero_observation(1)))),
                threading.Thread(target=lambda: results.update(ours=ours.infer(images, state)))]
    for t in threads[1:]:
        t.start()
    wait_for(lambda: len(server.queue) == 2, 60, "both requests queued behind the first batch")
    gated.gate.set()
    for t in threads:
        t.join(60)
    assert set(results) == {"first", "second", "ours"}
    assert results["second"]["server_timing"]["batch_size"] == 2 and results["ours"].timing.batch_size == 2
    ours.close()
    for c in (first, second):
        c._ws.close()


def test_a_full_queue_is_the_servers_overloaded_error(backend, openpi_serve):  # noqa: F811
    gated = GateBackend(backend)
    server, url = openpi_serve(gated, max_batch=1, max_queue=1, max_per_client=1)
    clients = [WebsocketClientPolicy(url) for _ in range(3)]
    done = []
    busy = [threading.Thread(target=lambda c=c: done.append(c.infer(libero_observation()))) for c in clients[:2]]
    busy[0].start()
    wait_for(gated.entered.is_set, 60, "the first request in the model")
    busy[1].start()
    wait_for(lambda: len(server.queue) == 1, 60, "the second request queued")
    with pytest.raises(RuntimeError, match="overloaded"):
        clients[2].infer(libero_observation())
    gated.gate.set()
    for t in busy:
        t.join(60)
    assert len(done) == 2


# ----- errors ---------------------------------------------------------------------------------------------------------
def test_a_bad_observation_is_a_text_error_then_close_1011_and_the_server_keeps_serving(backend, openpi_serve):  # noqa: F811
    server, url = openpi_serve(backend)
    client = WebsocketClientPolicy(url)
    with pytest.raises(RuntimeError, match="bad_shape") as e:
        client.infer({**libero_observation(), "observation/state": np.zeros(5, np.float32)})
    assert "[0, 7)" in str(e.value)
    with pytest.raises(ConnectionClosed):  # openpi closes the connection after an error
        client.infer(libero_observation())
    with pytest.raises(RuntimeError, match="non_finite"):  # the server's own check, after the map
        WebsocketClientPolicy(url).infer({**libero_observation(), "observation/state": np.full(8, np.inf)})
    text, code = raw_error(url, packb({**libero_observation(), "prompt": "x" * 200}))
    assert text.startswith(P.INSTRUCTION_TOO_LONG) and code == 1011
    assert WebsocketClientPolicy(url).infer(libero_observation())["actions"].shape == (16, 8)
    errors = server.health()["errors_by_code"]
    assert errors[P.BAD_SHAPE] == 1 and errors[P.NON_FINITE] == 1 and errors[P.INSTRUCTION_TOO_LONG] == 1


@pytest.mark.parametrize("payload, code", [
    (b"\x93\x01", P.BAD_MSGPACK),                  # truncated msgpack
    ("an observation as text", P.BAD_MESSAGE),     # a text frame
    (packb([1, 2, 3]), P.BAD_MESSAGE),             # not a map
    (packb({"observation/image": np.zeros((224, 224, 3), np.uint8)}), P.MISSING_FIELD),
    (packb({**libero_observation(), "observation/image": np.zeros((224, 224, 3), np.int32)}), P.BAD_DTYPE),
])
def test_malformed_messages_get_the_error_code_and_close_1011(backend, openpi_serve, payload, code):  # noqa: F811
    _, url = openpi_serve(backend)
    text, close_code = raw_error(url, payload)
    assert text.startswith(f"{code}:") and close_code == 1011
    assert WebsocketClientPolicy(url).infer(libero_observation())["actions"].shape == (16, 8)


def test_a_huge_message_is_cut_off_at_the_message_cap(backend, openpi_serve):  # noqa: F811
    server, url = openpi_serve(backend, limits=Limits(max_message_bytes=1 << 20))
    with connect(url, compression=None, max_size=None) as ws:
        ws.recv(timeout=30)
        with pytest.raises(ConnectionClosed):  # while sending, or at the next read
            ws.send(packb({**libero_observation(), "observation/image": np.zeros((1024, 1024, 3), np.uint8)}))
            ws.recv(timeout=30)
    assert ws.close_code == 1009  # message too big: closed before the message was kept
    assert WebsocketClientPolicy(url).infer(libero_observation())["actions"].shape == (16, 8)
    assert server.metrics.served == 1


def test_a_client_that_leaves_mid_request_does_not_stop_the_server(backend, openpi_serve):  # noqa: F811
    gated = GateBackend(backend)
    server, url = openpi_serve(gated)
    ws = connect(url, compression=None, max_size=None)
    ws.recv(timeout=30)
    ws.send(packb(libero_observation()))
    wait_for(gated.entered.is_set, 60, "the request in the model")
    ws.close()
    gated.gate.set()
    wait_for(lambda: server.metrics.served == 1, 60, "the abandoned chunk computed")
    assert WebsocketClientPolicy(url).infer(libero_observation())["actions"].shape == (16, 8)


# ----- health, API key, exposure -------------------------------------------------------------------------------------
def test_healthz_and_the_api_key(backend, openpi_serve):  # noqa: F811
    _, url = openpi_serve(backend, OpenpiConfig(port=0, api_key="s3cret"))
    with urllib.request.urlopen(url.replace("ws://", "http://") + "/healthz", timeout=30) as r:
        assert r.status == 200 and r.read() == b"OK\n"
    for key in (None, "wrong"):
        with pytest.raises(InvalidStatus) as e:
            WebsocketClientPolicy(url, api_key=key)
        assert e.value.response.status_code == 401
    for headers in ([("Authorization", "Api-Key s3cret")] * 2, [("Authorization", "Api-Key s\u00e9cret")]):
        with pytest.raises(InvalidStatus) as e:
            connect(url, additional_headers=headers)
        assert e.value.response.status_code == 401  # refused, not a server error
    assert WebsocketClientPolicy(url, api_key="s3cret").infer(libero_observation())["actions"].shape == (16, 8)


def test_connections_over_the_cap_get_503_until_one_closes(backend, openpi_serve):  # noqa: F811
    server, url = openpi_serve(backend, OpenpiConfig(port=0, max_connections=1))
    first = WebsocketClientPolicy(url)
    with pytest.raises(InvalidStatus) as e:
        WebsocketClientPolicy(url)
    assert e.value.response.status_code == 503
    first._ws.close()

    def connects() -> bool:
        try:
            connect(url).close()
            return True
        except InvalidStatus:
            return False

    wait_for(connects, 60, "a connection slot after the first client left")


def test_openpi_clients_are_served_beside_a_curve_secured_zeromq_endpoint(backend, openpi_serve, tmp_path):  # noqa: F811
    from policy_runtime.cli import main
    from policy_runtime.curve import CurveServerKeys

    assert main(["keys", "--out", str(tmp_path / "keys"), "--client", "robot"]) == 0
    keys = tmp_path / "keys"
    _, url = openpi_serve(backend, zmq=True, curve=CurveServerKeys(keys / "server.key_secret",
                                                                   keys / "authorized_clients"))
    assert WebsocketClientPolicy(url).infer(libero_observation())["actions"].shape == (16, 8)


def test_a_network_address_needs_an_api_key_or_insecure(backend, libero_map):  # noqa: F811
    server = PolicyServer(backend, ServerConfig(bind=None))
    OpenpiServer(server, load_openpi_map(libero_map), OpenpiConfig(host="0.0.0.0", port=0))
    with pytest.raises(UserError, match="API key"):
        server.start()


# ----- the command line -----------------------------------------------------------------------------------------------
def test_serve_openpi_only_from_the_command_line(tiny_export, libero_map, tmp_path):  # noqa: F811
    port = free_port()
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", ENTRY["policy-runtime"], "serve", str(tiny_export[1]), "--no-zmq",
                             "--openpi-port", str(port), "--openpi-map", str(libero_map), "--warmup", "0"],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                    return r.status == 200
            except OSError:
                assert proc.poll() is None, (tmp_path / "server.log").read_text()
                return False

        wait_for(healthy, 300, "the openpi port to answer /healthz")
        client = WebsocketClientPolicy("127.0.0.1", port)
        assert client.infer(libero_observation())["actions"].shape == (16, 8)
        client._ws.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        log.close()
    text = (tmp_path / "server.log").read_text()
    assert "serving openpi clients at ws://127.0.0.1" in text and "Traceback" not in text, text


MAP_CASES = [
    ("images: {base_camera: observation/image, wrist: observation/wrist_image}\nstate: {agent/qpos: zeros, "
     "agent/qvel: zeros}\n", "wrist"),
    ("images: {base_camera: observation/image}\nstate: {agent/qpos: zeros}\n", "agent/qvel"),
    ("images: {base_camera: observation/image}\nstate: {agent/qpos: [{zeros: 8}], agent/qvel: zeros}\n",
     "gives 8 values"),
    ("images: {base_camera: observation/image}\nstate: {agent/qpos: [{key: s, slice: [3, 1]}], agent/qvel: zeros}\n",
     "slice"),
    ("images: {base_camera: observation/image}\nstate: {agent/qpos: [{key: s, scale: .nan}], agent/qvel: zeros}\n",
     "scale"),
    ("images: {base_camera: 3}\nstate: {agent/qpos: zeros, agent/qvel: zeros}\n", "images"),
    ("images: {base_camera: observation/image}\nstate: {agent/qpos: zeros, agent/qvel: zeros}\ncameras: {}\n",
     "unknown field"),
    ("version: 2\nimages: {base_camera: observation/image}\nstate: {agent/qpos: zeros, agent/qvel: zeros}\n",
     "version"),
    ("images: [\n", "not valid YAML"),
]


@pytest.mark.parametrize("text, contains", MAP_CASES)
def test_a_bad_map_is_one_line_before_the_model_loads(tiny_export, tmp_path, text, contains):  # noqa: F811
    path = tmp_path / "map.yaml"
    path.write_text(text)
    assert_refused_unchanged("policy-runtime", ["serve", tiny_export[1], "--openpi-port", free_port(),
                                                "--openpi-map", path], [tmp_path, tiny_export[1]], contains)


@pytest.mark.parametrize("args, contains", [
    (["--no-zmq"], "--openpi-port"),
    (["--openpi-map", "configs/openpi_map_libero.yaml"], "--openpi-port"),
    (["--openpi-port", "70000"], "--openpi-port"),
    (["--openpi-port", "{port}", "--openpi-host", "0.0.0.0"], "API key"),
    (["--openpi-port", "{port}", "--openpi-api-key", " "], "empty"),
    (["--openpi-port", "{port}", "--no-zmq", "--bind", "tcp://127.0.0.1:{port}"], "--bind"),
    (["--openpi-port", "{busy}"], "cannot bind"),
    (["--openpi-port", "{port}", "--openpi-map", "missing.yaml"], "does not exist"),
    (["--openpi-port", "{port}", "--openpi-map", "configs/openpi_map_libero.yaml"], "extra/tcp_pose"),
])
def test_bad_openpi_options_are_one_line(tiny_export, tmp_path, args, contains):  # noqa: F811
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        values = {"port": free_port(), "busy": busy.getsockname()[1]}
        assert_refused_unchanged("policy-runtime", ["serve", tiny_export[1], *(a.format(**values) for a in args)],
                                 [tiny_export[1]], contains)


def test_a_client_gone_before_its_handler_starts_is_logged_not_raised():
    """getpeername() on a socket whose peer already left raises ENOTCONN; the handler logs that instead of failing
    (it once failed the connection-cap test under load)."""
    import socket

    from websockets.server import ServerProtocol
    from websockets.sync.server import ServerConnection

    from policy_runtime.openpi_server import _peer

    left = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # never connected: getpeername() -> ENOTCONN
    try:
        with pytest.raises(OSError):
            left.getpeername()
        connection = ServerConnection(left, ServerProtocol(), None)
        assert _peer(connection) == "a client that already left"
    finally:
        left.close()
