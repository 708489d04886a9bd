"""Wire format (docs/protocol.md): ndarray encoding, request validation with specific error codes, fuzzed decoding."""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy_runtime import protocol as P
from policy_runtime.client import Expectation
from policy_runtime.contract import CameraSpec
from policy_runtime.protocol import Contract, Limits, ProtocolError

CONTRACT = Contract(
    model_sha256="ab" * 32, backend="onnxruntime", provider="CPUExecutionProvider", horizon=4, exec_steps=2,
    action_dim=3, num_steps=2, control_mode="pd_joint_delta_pos", action_low=(-1.0,) * 3, action_high=(1.0,) * 3,
    clip_actions=True, cameras=(CameraSpec("base", 6, 5), CameraSpec("wrist", 4, 4)), state_dim=2,
    state_layout=(("qpos", 1), ("qvel", 1)), normalisation_sha256="cd" * 32, control_hz=20.0, text_max_len=8,
    default_instruction="pick", task="PickCube-v1", max_batch=4, instance="0123456789abcdef")


def valid_infer(**override) -> dict:
    msg = P.infer_request(7, {"base": np.zeros((6, 5, 3), np.uint8), "wrist": np.ones((4, 4, 3), np.uint8)},
                          np.zeros(2, np.float32), t_capture=12.5)
    msg.update(override)
    return msg


def parse(msg: dict | bytes, limits: Limits | None = None):
    return P.parse_request(msg if isinstance(msg, bytes) else P.encode(msg), CONTRACT, limits or Limits())


# ----- ndarray encoding ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.bool_, np.uint8, np.int8, np.uint16, np.int16, np.float16, np.uint32, np.int32,
                                   np.float32, np.uint64, np.int64, np.float64])
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 3, 4), (1, 0, 2)])
def test_ndarray_round_trip_keeps_dtype_shape_and_values(dtype, shape):
    a = (np.arange(int(np.prod(shape))) % 7).astype(dtype).reshape(shape)
    b = P.decode(P.encode({"x": a}))["x"]
    assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b)
    assert not b.flags.writeable  # zero-copy view of the received bytes


def test_ndarray_encoding_is_byte_exact_as_documented():
    a = np.array([[1.0, -2.0]], np.float32)
    ext = P.pack_ndarray(a)
    assert ext.code == 1
    assert ext.data == b"\x03<f4" + b"\x02" + struct.pack("<QQ", 1, 2) + struct.pack("<ff", 1.0, -2.0)
    doc = "c7 1d 01 03 3c 66 34 02 01 00 00 00 00 00 00 00 02 00 00 00 00 00 00 00 00 00 80 3f 00 00 00 c0"
    assert msgpack.packb(ext) == bytes.fromhex(doc)  # the example in docs/protocol.md section 2
    # big-endian and non-contiguous inputs are normalised before they go on the wire
    assert P.pack_ndarray(a.astype(">f4")).data == ext.data
    assert P.pack_ndarray(np.asfortranarray(np.arange(6, dtype="<i8").reshape(2, 3))).data.endswith(
        np.arange(6, dtype="<i8").tobytes())


@pytest.mark.parametrize("bad", [np.array([object()]), np.array([1 + 2j]), np.zeros(2, "V4"), np.array(["s"])])
def test_encoder_refuses_object_complex_void_and_string_dtypes(bad):
    with pytest.raises(TypeError):
        P.encode({"x": bad})


def ext(payload: bytes, code: int = 1) -> bytes:
    return msgpack.packb({"x": msgpack.ExtType(code, payload)}, use_bin_type=True)


@pytest.mark.parametrize("dt", ["|O", "<c8", "|V4", "<U1", ">f4", "<M8[s]", "xyz"])
def test_decoder_rejects_unsafe_dtypes(dt):
    payload = bytes([len(dt)]) + dt.encode() + b"\x01" + struct.pack("<Q", 1) + b"\x00" * 8
    with pytest.raises(ProtocolError) as e:
        P.decode(ext(payload))
    assert e.value.code == P.BAD_ARRAY


def test_decoder_rejects_sizes_that_do_not_match_the_shape_and_absurd_shapes():
    head = b"\x03<f4\x01"
    with pytest.raises(ProtocolError) as e:
        P.decode(ext(head + struct.pack("<Q", 3) + b"\x00" * 8))  # 3 floats need 12 bytes
    assert e.value.code == P.BAD_ARRAY
    with pytest.raises(ProtocolError) as e:  # claims 2^60 elements: refused before any allocation
        P.decode(ext(b"\x03<f4\x02" + struct.pack("<QQ", 2**30, 2**30) + b"\x00" * 4))
    assert e.value.code == P.ARRAY_TOO_LARGE
    with pytest.raises(ProtocolError) as e:
        P.decode(ext(b"\x03<f4"))  # truncated header
    assert e.value.code == P.BAD_ARRAY
    with pytest.raises(ProtocolError) as e:
        P.decode(ext(b"\x00", code=5))
    assert e.value.code == P.BAD_ARRAY


def test_array_and_message_caps_are_configurable():
    data = P.encode({"x": np.zeros(1000, np.float32)})
    assert P.decode(data, Limits(max_array_bytes=4000))["x"].shape == (1000,)
    with pytest.raises(ProtocolError) as e:
        P.decode(data, Limits(max_array_bytes=3999))
    assert e.value.code in (P.ARRAY_TOO_LARGE, P.BAD_MSGPACK)
    with pytest.raises(ProtocolError) as e:
        P.decode(data, Limits(max_message_bytes=100))
    assert e.value.code == P.MESSAGE_TOO_LARGE


# ----- request validation -------------------------------------------------------------------------------------------
def test_valid_infer_request_parses_with_all_optional_fields():
    req = parse(valid_infer(instruction="grab", noise_seed=3, prev_chunk=np.zeros((2, 3), np.float32), delay_steps=1,
                            timeout_ms=250))
    assert isinstance(req, P.InferRequest)
    assert req.request_id == 7 and req.t_capture == 12.5 and req.instruction == "grab" and req.noise_seed == 3
    assert set(req.images) == {"base", "wrist"} and req.state.dtype == np.float32
    assert req.prev_chunk.shape == (2, 3) and req.delay_steps == 1 and req.timeout_ms == 250


def test_hello_and_ping_parse():
    assert isinstance(parse(P.hello_request(1, "robot")), P.HelloRequest)
    assert isinstance(parse(P.ping_request(2)), P.PingRequest)


def _without(key: str) -> dict:
    m = valid_infer()
    del m[key]
    return m


BAD_REQUESTS = {
    "not a map": ([1, 2, 3], P.BAD_MESSAGE),
    "no kind": ({"request_id": 1}, P.BAD_MESSAGE),
    "unknown kind": ({"kind": "explode", "request_id": 1}, P.UNKNOWN_KIND),
    "hello old version": ({"kind": "hello", "request_id": 1, "protocol": 0}, P.UNSUPPORTED_VERSION),
    "missing request_id": (_without("request_id"), P.MISSING_FIELD),
    "bool request_id": (valid_infer(request_id=True), P.BAD_TYPE),
    "negative request_id": (valid_infer(request_id=-1), P.BAD_TYPE),
    "missing images": (_without("images"), P.MISSING_FIELD),
    "missing state": (_without("state"), P.MISSING_FIELD),
    "missing t_capture": (_without("t_capture"), P.MISSING_FIELD),
    "nan t_capture": (valid_infer(t_capture=float("nan")), P.BAD_TYPE),
    "unknown field": (valid_infer(extra=1), P.UNKNOWN_FIELD),
    "images not a map": (valid_infer(images=[1]), P.BAD_TYPE),
    "missing camera": (valid_infer(images={"base": np.zeros((6, 5, 3), np.uint8)}), P.MISSING_CAMERA),
    "unknown camera": (valid_infer(images={"base": np.zeros((6, 5, 3), np.uint8),
                                           "wrist": np.zeros((4, 4, 3), np.uint8),
                                           "top": np.zeros((4, 4, 3), np.uint8)}), P.UNKNOWN_CAMERA),
    "image as list": (valid_infer(images={"base": [[0]], "wrist": np.zeros((4, 4, 3), np.uint8)}), P.BAD_TYPE),
    "image float": (valid_infer(images={"base": np.zeros((6, 5, 3), np.float32),
                                        "wrist": np.zeros((4, 4, 3), np.uint8)}), P.BAD_DTYPE),
    "image CHW": (valid_infer(images={"base": np.zeros((3, 6, 5), np.uint8),
                                      "wrist": np.zeros((4, 4, 3), np.uint8)}), P.BAD_SHAPE),
    "state float64": (valid_infer(state=np.zeros(2, np.float64)), P.BAD_DTYPE),
    "state wrong dim": (valid_infer(state=np.zeros(3, np.float32)), P.BAD_SHAPE),
    "state NaN": (valid_infer(state=np.array([0.0, np.nan], np.float32)), P.NON_FINITE),
    "state Inf": (valid_infer(state=np.array([np.inf, 0.0], np.float32)), P.NON_FINITE),
    "instruction not str": (valid_infer(instruction=5), P.BAD_TYPE),
    "instruction too long": (valid_infer(instruction="x" * 8), P.INSTRUCTION_TOO_LONG),
    "instruction multibyte too long": (valid_infer(instruction="\u00e9" * 4), P.INSTRUCTION_TOO_LONG),
    "seed float": (valid_infer(noise_seed=1.5), P.BAD_TYPE),
    "seed too big": (valid_infer(noise_seed=2**64 - 1), P.BAD_TYPE),
    "delay too big": (valid_infer(delay_steps=5), P.BAD_TYPE),
    "prev_chunk too long": (valid_infer(prev_chunk=np.zeros((5, 3), np.float32)), P.BAD_SHAPE),
    "prev_chunk wrong dim": (valid_infer(prev_chunk=np.zeros((2, 4), np.float32)), P.BAD_SHAPE),
    "prev_chunk NaN": (valid_infer(prev_chunk=np.full((2, 3), np.nan, np.float32)), P.NON_FINITE),
    "timeout negative": (valid_infer(timeout_ms=-1), P.BAD_TYPE),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_each_invalid_request_gets_its_specific_error_code(name):
    msg, code = BAD_REQUESTS[name]
    with pytest.raises(ProtocolError) as e:
        parse(P.encode(msg) if not isinstance(msg, dict) else msg)
    assert e.value.code == code, e.value
    assert code in P.ERROR_CODES
    if isinstance(msg, dict) and msg.get("request_id") == 7:
        assert e.value.request_id == 7  # echoed so the client can match the error to its request


def test_invalid_bytes_are_bad_msgpack():
    for data in (b"", b"\xc1", b"\x92\x01", P.encode({"kind": "ping"}) + b"\x00", b"\xdd\xff\xff\xff\xff"):
        with pytest.raises(ProtocolError) as e:
            parse(data)
        assert e.value.code == P.BAD_MSGPACK


def test_contract_round_trips_through_the_wire():
    wire = P.decode(P.encode(P.hello_reply(1, CONTRACT)))
    reply = P.parse_reply(P.encode(wire))
    assert isinstance(reply, P.HelloReply) and reply.contract == CONTRACT
    assert wire["contract"]["instruction"]["max_bytes"] == 7


def test_actions_and_error_replies_round_trip():
    r = P.ActionsReply(9, np.ones((4, 3), np.float32), "inst", 1.5, True, 2, P.Timing(1, 2, 3, 4, 5, 6, 2), 1, False)
    got = P.parse_reply(P.encode(P.actions_reply(r, P.pack_ndarray(r.actions))))
    assert isinstance(got, P.ActionsReply) and got.request_id == 9 and got.timing.batch_size == 2
    assert np.array_equal(got.actions, r.actions) and got.clipped_values == 2 and got.delay_steps == 1
    err = P.parse_reply(P.encode(P.error_reply(P.OVERLOADED, "busy", 9)))
    assert isinstance(err, P.ErrorReply) and err.code == P.OVERLOADED and err.request_id == 9


def test_expectation_names_every_mismatch_on_its_own_line():
    exp = Expectation(horizon=50, action_dim=3, cameras={"base": (224, 224), "top": (4, 4)},
                      normalisation_sha256="ff" * 32)
    lines = exp.mismatches(CONTRACT)
    assert any(ln.startswith("horizon: robot expects 50, server has 4") for ln in lines)
    assert any("camera base" in ln and "224x224" in ln for ln in lines)
    assert any("camera top" in ln for ln in lines) and any("camera wrist" in ln for ln in lines)
    assert any(ln.startswith("normalisation_sha256") for ln in lines)
    assert len(lines) == 5 and all("\n" not in ln for ln in lines)
    assert Expectation(horizon=4, action_dim=3, cameras={"base": (6, 5), "wrist": (4, 4)}).mismatches(CONTRACT) == []


# ----- protocol 2: large arrays as attached frames --------------------------------------------------------------------
def _frame_ref(dtype: str, shape: tuple[int, ...], index: int) -> msgpack.ExtType:
    head = bytes([len(dtype)]) + dtype.encode() + bytes([len(shape)]) + struct.pack(f"<{len(shape)}Q", *shape)
    return msgpack.ExtType(P.FRAME_NDARRAY_EXT, head + struct.pack("<I", index))


def test_large_arrays_travel_as_attached_frames_without_a_copy():
    big = np.arange(6 * 5 * 3, dtype=np.uint8).reshape(6, 5, 3)
    small = np.array([0.5, -1.0], np.float32)
    frames = P.encode_frames({"big": big, "small": small, "fortran": np.asfortranarray(np.eye(3))},
                             inline_max_bytes=16)
    assert len(frames) == 3  # header + big + fortran (made contiguous); small (8 bytes) stays inline
    assert np.shares_memory(np.frombuffer(frames[1], np.uint8), big)  # the caller's buffer, not a copy
    got = P.decode(frames[0], Limits(), frames[1:])
    assert np.array_equal(got["big"], big) and got["big"].dtype == np.uint8 and not got["big"].flags.writeable
    assert np.array_equal(got["small"], small) and np.array_equal(got["fortran"], np.eye(3))
    assert np.shares_memory(got["big"], np.frombuffer(frames[1], np.uint8))  # decoding does not copy either


def test_protocol_2_request_parses_like_the_single_frame_one():
    msg = valid_infer(instruction="go", noise_seed=3)
    header, *attached = P.encode_frames(msg, inline_max_bytes=32)
    assert len(attached) == 2  # both cameras (90 and 48 bytes); the state (8 bytes) inline
    v2, v1 = P.parse_request(header, CONTRACT, Limits(), attached), parse(msg)
    assert v2.request_id == v1.request_id == 7 and v2.noise_seed == 3 and v2.instruction == "go"
    for cam in ("base", "wrist"):
        assert np.array_equal(v2.images[cam], v1.images[cam])
    assert np.array_equal(v2.state, v1.state)


def test_both_protocol_versions_are_accepted_at_hello_and_no_other():
    assert P.PROTOCOL_VERSION == 2
    for version in P.SUPPORTED_VERSIONS:
        assert parse({"kind": "hello", "request_id": 1, "protocol": version}).protocol == version
    with pytest.raises(ProtocolError) as e:
        parse({"kind": "hello", "request_id": 1, "protocol": 3})
    assert e.value.code == P.UNSUPPORTED_VERSION


FRAME_CASES = {
    "frame not referenced": ({"kind": "ping", "request_id": 7}, [b"x" * 8], P.BAD_FRAME),
    "reference past the frames": ({"x": _frame_ref("|u1", (4,), 1)}, [b"abcd"], P.BAD_ARRAY),
    "frame referenced twice": ({"x": _frame_ref("|u1", (4,), 0), "y": _frame_ref("|u1", (4,), 0)}, [b"abcd"],
                               P.BAD_ARRAY),
    "frame shorter than shape": ({"x": _frame_ref("<f4", (4,), 0)}, [b"abcd"], P.BAD_ARRAY),
    "frame longer than shape": ({"x": _frame_ref("|u1", (2,), 0)}, [b"abcd"], P.BAD_ARRAY),
    "reference without index": ({"x": msgpack.ExtType(P.FRAME_NDARRAY_EXT, b"\x03|u1\x01" + bytes(8))}, [],
                                P.BAD_ARRAY),
    "disallowed dtype": ({"x": _frame_ref("|O", (1,), 0)}, [bytes(8)], P.BAD_ARRAY),
    "array over the cap": ({"x": _frame_ref("|u1", (64,), 0)}, [bytes(64)], P.ARRAY_TOO_LARGE),
    "too many frames": ({"x": 1}, [b"a"] * 5, P.BAD_FRAME),
    "message over the cap": ({"x": _frame_ref("|u1", (60,), 0)}, [bytes(60), bytes(60)], P.MESSAGE_TOO_LARGE),
}


@pytest.mark.parametrize("name", list(FRAME_CASES))
def test_each_malformed_attachment_gets_its_specific_error_code(name):
    header, attached, code = FRAME_CASES[name]
    limits = Limits(max_message_bytes=100, max_array_bytes=32, max_frames=4)
    with pytest.raises(ProtocolError) as e:
        P.decode(msgpack.packb(header, use_bin_type=True), limits, attached)
    assert e.value.code == code, e.value


# ----- fuzzing: the decoder raises only ProtocolError -----------------------------------------------------------------
def _only_protocol_errors(data: bytes) -> None:
    try:
        parse(data, Limits(max_array_bytes=1 << 16, max_message_bytes=1 << 20))
    except ProtocolError as e:
        assert e.code in P.ERROR_CODES


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(data):
    _only_protocol_errors(data)


_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=10),
                  st.binary(max_size=16),
                  st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=40)),
                  st.just(msgpack.Timestamp(1, 2)),
                  st.builds(lambda n, dt: msgpack.ExtType(1, bytes([len(dt)]) + dt.encode() + bytes([1]) +
                                                          struct.pack("<Q", n) + bytes(n)),
                            st.integers(0, 64), st.sampled_from(["|u1", "<f4", "|O", "<c8"])))
_values = st.recursive(_leaf, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                                                        max_size=4), max_leaves=20)
_keys = st.sampled_from(sorted(P.INFER_FIELDS | {"protocol", "client", "x"}))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_keys, _values, max_size=8), st.sampled_from(["infer", "hello", "ping", None, "x"]))
def test_fuzz_structured_messages(fields, kind):
    if kind is not None:
        fields["kind"] = kind
    _only_protocol_errors(msgpack.packb(fields, use_bin_type=True))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_valid_requests(data):
    raw = bytearray(P.encode(valid_infer(instruction="go", noise_seed=1)))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    _only_protocol_errors(bytes(raw[:cut]) if data.draw(st.booleans()) else bytes(raw))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_multipart_requests(data):
    header, *attached = P.encode_frames(valid_infer(instruction="go"), inline_max_bytes=32)
    raw = bytearray(header)
    for _ in range(data.draw(st.integers(0, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    frames = [bytes(f) for f in attached]
    choice = data.draw(st.sampled_from(["keep", "drop", "extra", "truncate", "swap"]))
    if choice == "drop":
        frames.pop(data.draw(st.integers(0, len(frames) - 1)))
    elif choice == "extra":
        frames.append(data.draw(st.binary(max_size=64)))
    elif choice == "truncate":
        k = data.draw(st.integers(0, len(frames) - 1))
        frames[k] = frames[k][:data.draw(st.integers(0, len(frames[k])))]
    elif choice == "swap":
        frames.reverse()
    try:
        P.parse_request(bytes(raw), CONTRACT, Limits(max_array_bytes=1 << 16, max_message_bytes=1 << 20), frames)
    except ProtocolError as e:
        assert e.code in P.ERROR_CODES


def test_batch_queue_stops_waiting_once_every_active_client_is_queued():
    import time

    from policy_runtime.batching import BatchQueue

    q: BatchQueue[int] = BatchQueue(8)
    q.offer("a", 1)
    t0 = time.monotonic()
    assert q.take(8, 0.5, expected=lambda: 1) == [1]
    assert time.monotonic() - t0 < 0.1  # a lone client is not delayed by the batching window
    q.offer("a", 2)
    t0 = time.monotonic()
    assert q.take(8, 0.2, expected=lambda: 2) == [2]
    assert time.monotonic() - t0 >= 0.19  # a second active client may still send: wait for it


def test_batch_queue_gives_each_client_a_bounded_fair_share():
    from policy_runtime.batching import BatchQueue

    q: BatchQueue[str] = BatchQueue(6, per_key=4)
    accepted = [q.offer("flood", f"f{i}")[0] for i in range(6)]
    assert accepted == [True] * 4 + [False] * 2 and not q.admits("flood")  # its share, no more
    assert q.offer("b", "b0") == (True, None) and q.offer("c", "c0") == (True, None)  # queue now full (6)
    ok, displaced = q.offer("d", "d0")  # full: the newcomer displaces the largest holder's newest item
    assert ok and displaced == "f3" and q.pending("flood") == 3
    assert q.take(4, 0.0) == ["f0", "b0", "c0", "d0"]  # one per client per round
    assert q.take(4, 0.0) == ["f1", "f2"]
