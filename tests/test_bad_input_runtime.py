"""Bad input to `policy-runtime`: each case is one line on stderr, exit 2, no traceback, no file changed.

Covers the sizes and counts that could exhaust a shared machine (threads, batch, queue, array caps), endpoints
libzmq would silently bind elsewhere, network exposure without CURVE, a CURVE key that used to hang the
server, and exports whose manifest, normalisation file or graph disagree.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
from pathlib import Path

import pytest

from tests.bad_input import assert_refused_unchanged, assert_user_error, run_cli
from tests.test_runtime_server import tiny_export  # noqa: F401  (the session fixture: a real tiny export)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def export(tiny_export, tmp_path) -> Path:  # noqa: F811
    """A private copy of the tiny export that a case may break."""
    return Path(shutil.copytree(tiny_export[1], tmp_path / "export"))


SERVE_CASES = [
    (["--max-batch", "20000"], "--max-batch"),
    (["--max-batch", "0"], "--max-batch"),
    (["--max-queue", "0"], "--max-queue"),
    (["--max-queue", "1000000"], "--max-queue"),
    (["--max-per-client", "0"], "--max-per-client"),
    (["--max-per-client", "33"], "--max-per-client"),  # more than the whole queue (32)
    (["--max-array-mb", "nan"], "--max-array-mb"),
    (["--max-array-mb", "inf"], "--max-array-mb"),
    (["--max-array-mb", "1e12"], "--max-array-mb"),
    (["--max-array-mb", "0"], "--max-array-mb"),
    (["--max-wait-ms", "nan"], "--max-wait-ms"),
    (["--max-wait-ms", "-1"], "--max-wait-ms"),
    (["--threads", "100000"], "--threads"),
    (["--threads", "-1"], "--threads"),
    (["--threads", "many"], "--threads"),
    (["--seed", "-1"], "--seed"),
    (["--warmup", "-1"], "--warmup"),
    (["--bind", "tcp://127.0.0.1:99999"], "port"),
    (["--bind", "tcp://127.0.0.1"], "port"),
    (["--bind", "udp://127.0.0.1:5555"], "tcp://"),
    (["--bind", "5555"], "tcp://"),
    (["--bind", "tcp://0.0.0.0:{port}"], "CURVE"),
    (["--bind", "tcp://*:{port}"], "--insecure"),
    (["--curve-secret", "server.key_secret"], "go together"),
]


@pytest.mark.parametrize(("args", "contains"), SERVE_CASES, ids=[" ".join(a) for a, _ in SERVE_CASES])
def test_serve_refuses(export, args, contains):
    args = [a.format(port=free_port()) for a in args]
    assert_refused_unchanged("policy-runtime", ["serve", export, *args], watched=[export], contains=contains)


def _edit_manifest(export: Path, **changes) -> None:
    m = json.loads((export / "manifest.json").read_text())
    for dotted, value in changes.items():
        *path, key = dotted.split("__")
        node = m
        for p in path:
            node = node[p]
        node[key] = value
    (export / "manifest.json").write_text(json.dumps(m))


def _truncate_norm_stats(export: Path) -> None:
    data = (export / "norm_stats.json").read_bytes()
    (export / "norm_stats.json").write_bytes(data[: len(data) // 2])


def _first_camera_height(export: Path) -> None:
    m = json.loads((export / "manifest.json").read_text())
    m["cameras"][0]["height"] = 48  # the graph takes 32x32 images
    (export / "manifest.json").write_text(json.dumps(m))


CHECK_CASES = {
    "exec_steps 100": (lambda e: _edit_manifest(e, exec_steps=100), "exec_steps"),
    "exec_steps -3": (lambda e: _edit_manifest(e, exec_steps=-3), "exec_steps"),
    "num_steps 0": (lambda e: _edit_manifest(e, num_steps=0), "num_steps"),
    "control_hz 0": (lambda e: _edit_manifest(e, control_hz=0), "control_hz"),
    "action low above high": (lambda e: _edit_manifest(e, action__low=[2.0] * 8), "bounds"),
    "truncated norm_stats.json": (_truncate_norm_stats, "norm_stats.json"),
    "missing norm_stats.json": (lambda e: (e / "norm_stats.json").unlink(), "norm_stats.json is missing"),
    "manifest camera size disagrees with the graph": (_first_camera_height, "graph image.base_camera"),
    "horizon disagrees with the graph": (lambda e: _edit_manifest(e, horizon=12), "graph noise"),
}


@pytest.mark.parametrize("case", list(CHECK_CASES))
def test_check_refuses(export, case):
    breaks, contains = CHECK_CASES[case]
    breaks(export)
    assert_refused_unchanged("policy-runtime", ["check", export, "--threads", "1"], watched=[export],
                             contains=contains)


def test_check_refuses_an_unbounded_thread_count(export):
    assert_refused_unchanged("policy-runtime", ["check", export, "--threads", "100000"], watched=[export],
                             contains="--threads")


def test_serve_with_a_curve_key_of_invalid_characters_fails_fast(export, tmp_path):
    """Before: the key passed the file checks, libzmq refused it after the model loaded, and the authenticator
    thread kept the process alive forever."""
    keys = tmp_path / "keys"
    assert run_cli("policy-runtime", ["keys", "--out", keys]).returncode == 0
    secret = keys / "server.key_secret"
    text = secret.read_text()
    key = re.search(r'secret-key = "(.{40})"', text)[1]
    secret.write_text(text.replace(key, key[:10] + "~" + key[11:]))
    watched = [export, keys]
    before = {p: p.read_bytes() for root in watched for p in root.rglob("*") if p.is_file()}
    result = run_cli("policy-runtime", ["serve", export, "--curve-secret", secret, "--curve-clients",
                                        keys / "authorized_clients", "--warmup", "0"], timeout=60)
    assert_user_error(result, contains="Z85")
    assert {p: p.read_bytes() for p in before} == before
