"""`policy-runtime`: serve an export over ZeroMQ and/or openpi's websocket protocol (`serve`), re-verify it on this
machine (`check`), make CURVE keys.

User mistakes (missing directory, corrupt manifest, bad key file, port in use) print one line on stderr and
exit 2; `check` exits 1 when the export loads but misbehaves (non-deterministic, NaN, batch-dependent).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
from pathlib import Path

from policy_runtime.errors import OneLineParser, UserError, run_command
from policy_runtime.hub import local_dir
from policy_runtime.openpi_server import API_KEY_ENV
from policy_runtime.protocol import DEFAULT_ENDPOINT, Limits

log = logging.getLogger("policy_runtime")

# Upper bounds so one typo cannot exhaust a shared machine (threads, warm-up memory, queue memory).
MAX_THREADS = max(64, 4 * (os.cpu_count() or 1))
MAX_BATCH = 256
MAX_QUEUE = 4096
MAX_WAIT_MS = 1000.0
MAX_ARRAY_MB = 1024.0
MAX_WARMUP = 100


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="policy-runtime",
                      description="Serve an exported flow VLA (ONNX Runtime) as action chunks over ZeroMQ.")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="serve an export directory (or a checkpoint with --backend torch)")
    s.add_argument("model_dir", help="export directory (policy.onnx + manifest.json), or "
                                     "hf://owner/repo[@revision][/subdir] (needs the [hub] extra)")
    s.add_argument("--bind", default=None, help=f"ZeroMQ endpoint (default {DEFAULT_ENDPOINT})")
    s.add_argument("--no-zmq", action="store_true", help="no ZeroMQ endpoint: serve openpi clients only")
    s.add_argument("--openpi-port", type=int, default=None,
                   help="also serve openpi's websocket protocol on this port (openpi_client.WebsocketClientPolicy)")
    s.add_argument("--openpi-host", default="127.0.0.1", help="openpi listen address (default 127.0.0.1)")
    s.add_argument("--openpi-map", type=Path, default=None,
                   help="YAML map from the client's observation keys to this export's cameras, state and "
                        "instruction (docs/openpi.md; default: observation/<camera>, observation/state, prompt)")
    s.add_argument("--openpi-api-key", default=None,
                   help="require 'Authorization: Api-Key KEY' from openpi clients; prefer the environment variable "
                        f"{API_KEY_ENV} (a command line is visible to every user of the machine)")
    s.add_argument("--backend", choices=("onnx", "torch"), default="onnx",
                   help="torch serves a sim_trainer checkpoint directory instead (needs torch)")
    s.add_argument("--providers", nargs="+", default=None,
                   help="ONNX Runtime providers in preference order (default TensorRT CUDA CPU, filtered to "
                        "what is installed); short names trt/cuda/cpu accepted")
    s.add_argument("--require-gpu", action="store_true", help="fail instead of running on the CPU")
    s.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = ORT default)")
    s.add_argument("--no-iobinding", action="store_true", help="plain run() even on a GPU provider")
    s.add_argument("--device", default="cpu", help="torch backend device")
    s.add_argument("--cuda-graph", action="store_true", help="torch backend: capture CUDA graphs")
    s.add_argument("--max-batch", type=int, default=8)
    s.add_argument("--max-wait-ms", type=float, default=2.0)
    s.add_argument("--max-queue", type=int, default=32)
    s.add_argument("--max-per-client", type=int, default=4,
                   help="pending observations one client (ZeroMQ identity) may hold; its share of the queue")
    s.add_argument("--max-array-mb", type=float, default=16.0, help="largest accepted array")
    s.add_argument("--seed", type=int, default=0, help="server noise stream seed")
    s.add_argument("--warmup", type=int, default=3, help="warm-up runs per batch size before serving")
    s.add_argument("--curve-secret", type=Path, help="server secret key file (*.key_secret); enables CURVE")
    s.add_argument("--curve-clients", type=Path, help="directory of authorised client public keys (*.key)")
    s.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --bind without CURVE, or a non-loopback --openpi-host without an API "
                        "key (anyone on the network can drive the model)")
    s.add_argument("-v", "--verbose", action="store_true")

    c = sub.add_parser("check", help="re-verify an export on this machine (hash, session, determinism, latency)")
    c.add_argument("export_dir", help="export directory, or hf://owner/repo[@revision][/subdir]")
    c.add_argument("--providers", nargs="+", default=None)
    c.add_argument("--require-gpu", action="store_true")
    c.add_argument("--threads", type=int, default=0)

    k = sub.add_parser("keys", help="generate CURVE key pairs for a server and its clients")
    k.add_argument("--out", type=Path, required=True)
    k.add_argument("--client", action="append", default=None, help="client name (repeatable; default 'robot')")
    k.add_argument("--force", action="store_true", help="overwrite existing keys")
    return p


PROVIDER_ALIASES = {"trt": "TensorrtExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
                    "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


def _onnx_options(args: argparse.Namespace, warmup: int = 3, batch_sizes: tuple[int, ...] = (1,)):
    from policy_runtime.backends.onnx_backend import DEFAULT_PROVIDERS, OnnxOptions

    providers = tuple(PROVIDER_ALIASES.get(p.lower(), p) for p in args.providers) if args.providers \
        else DEFAULT_PROVIDERS
    return OnnxOptions(providers=providers, require_gpu=args.require_gpu, intra_op_threads=args.threads,
                       warmup_runs=warmup, warmup_batch_sizes=batch_sizes,
                       iobinding=not getattr(args, "no_iobinding", False), seed=getattr(args, "seed", 0))


def _in_range(option: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    """Refuse NaN, infinities and values outside [low, high] (or (low, high]) naming the option and the range."""
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        raise UserError(f"{option} {value:g} is outside {'(' if low_open else '['}{low:g}, {high:g}]")


def _check_numbers(args: argparse.Namespace) -> None:
    _in_range("--threads", args.threads, 0, MAX_THREADS)
    if args.cmd != "serve":
        return
    _in_range("--max-batch", args.max_batch, 1, MAX_BATCH)
    _in_range("--max-queue", args.max_queue, 1, MAX_QUEUE)
    _in_range("--max-per-client", args.max_per_client, 1, args.max_queue)
    _in_range("--max-wait-ms", args.max_wait_ms, 0, MAX_WAIT_MS)
    _in_range("--max-array-mb", args.max_array_mb, 0, MAX_ARRAY_MB, low_open=True)
    _in_range("--warmup", args.warmup, 0, MAX_WARMUP)
    _in_range("--seed", args.seed, 0, 2**63 - 1)
    if args.openpi_port is not None:
        _in_range("--openpi-port", args.openpi_port, 0, 65535)


def _openpi_options(args: argparse.Namespace):
    """The openpi front end's settings, or None without --openpi-port; checks the flags that go with it."""
    from policy_runtime.openpi_server import OpenpiConfig, check_openpi_exposure, probe_port

    if args.no_zmq and args.bind is not None:
        raise UserError("--no-zmq turns the ZeroMQ endpoint off: drop --bind")
    if args.no_zmq and args.curve_secret is not None:
        raise UserError("--curve-secret/--curve-clients secure the ZeroMQ endpoint, which --no-zmq turns off")
    api_key = args.openpi_api_key if args.openpi_api_key is not None else os.environ.get(API_KEY_ENV)
    if args.openpi_port is None:
        if args.no_zmq or args.openpi_map is not None or args.openpi_api_key is not None:
            raise UserError("--no-zmq, --openpi-map and --openpi-api-key need --openpi-port")
        return None
    if api_key is not None and not api_key.strip():
        raise UserError(f"the openpi API key (--openpi-api-key or {API_KEY_ENV}) is empty")
    check_openpi_exposure(args.openpi_host, api_key, args.insecure)
    probe_port(args.openpi_host, args.openpi_port)
    return OpenpiConfig(host=args.openpi_host, port=args.openpi_port, api_key=api_key, insecure=args.insecure)


def _openpi_map(args: argparse.Namespace, contract):
    """The key map, checked against the served contract (one line per mistake)."""
    from policy_runtime.openpi_map import OpenpiMap, load_openpi_map

    key_map = load_openpi_map(args.openpi_map) if args.openpi_map is not None else OpenpiMap.default(contract)
    return key_map.check(contract)


def _serve(args: argparse.Namespace) -> int:
    from policy_runtime.curve import CurveServerKeys
    from policy_runtime.server import PolicyServer, ServerConfig, check_exposure, parse_endpoint, probe_bind

    if (args.curve_secret is None) != (args.curve_clients is None):
        raise UserError("--curve-secret and --curve-clients go together")
    _check_numbers(args)
    openpi = _openpi_options(args)
    bind = None if args.no_zmq else args.bind or DEFAULT_ENDPOINT
    if bind is not None:
        parse_endpoint(bind)
        check_exposure(bind, curve=args.curve_secret is not None, insecure=args.insecure)
    curve = CurveServerKeys(args.curve_secret, args.curve_clients) if args.curve_secret else None
    if curve is not None:  # fail on bad keys before spending time on loading the model
        from policy_runtime.curve import check_clients_dir, load_keypair
        load_keypair(curve.secret_file, need_secret=True)
        check_clients_dir(curve.clients_dir)
    args.model_dir = str(local_dir(args.model_dir))  # an hf:// path: downloaded, or from the local cache offline
    if not Path(args.model_dir).exists():
        raise UserError(f"{args.model_dir} does not exist")
    if not Path(args.model_dir).is_dir():
        raise UserError(f"{args.model_dir} is a file, not an export or checkpoint directory")
    if bind is not None:
        probe_bind(bind)  # nothing is logged before the checks, so a user mistake stays one line on stderr
    if openpi is not None and args.backend == "onnx":  # a map that does not fit the export: before the model loads
        from policy_runtime.contract import contract_from_manifest
        from policy_runtime.export_dir import load_export

        export = load_export(args.model_dir, verify_hash=False)
        _openpi_map(args, contract_from_manifest(export.manifest, "onnx", "none", where=str(export.path)))
    if args.backend == "torch":
        try:
            from policy_runtime.backends.torch_backend import TorchBackend, TorchOptions
        except ModuleNotFoundError as e:  # a robot install: the base has no torch
            if e.name != "torch":
                raise
            raise UserError("--backend torch needs the [train] extra (torch is not installed): "
                            "pip install 'vla-rl-stack[train]'") from None
        backend = TorchBackend(args.model_dir, TorchOptions(device=args.device, cuda_graph=args.cuda_graph,
                                                            warmup_runs=args.warmup, seed=args.seed))
    else:
        from policy_runtime.backends.onnx_backend import OnnxBackend
        sizes = tuple(sorted({1, args.max_batch}))
        backend = OnnxBackend(args.model_dir, _onnx_options(args, args.warmup, sizes))
    log.info("loaded %s (%s backend): %s", args.model_dir, args.backend, backend.info())
    limits = Limits(max_array_bytes=int(args.max_array_mb * (1 << 20)),
                    max_message_bytes=max(Limits().max_message_bytes, 4 * int(args.max_array_mb * (1 << 20))))
    server = PolicyServer(backend, ServerConfig(bind=bind, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                                                max_queue=args.max_queue, max_per_client=args.max_per_client,
                                                limits=limits, curve=curve, insecure=args.insecure))
    if openpi is not None:
        from policy_runtime.openpi_server import OpenpiServer

        OpenpiServer(server, _openpi_map(args, server.contract), openpi)
    server.start()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        server.request_stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    server.run()
    backend.close()
    return 0


def _check(args: argparse.Namespace) -> int:
    from policy_runtime.check import check_export

    _check_numbers(args)
    report = check_export(local_dir(args.export_dir), _onnx_options(args))
    for line in report.lines:
        print(line)
    for p in report.problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    print("check passed" if report.ok else f"check FAILED ({len(report.problems)} problem(s))")
    return 0 if report.ok else 1


def _keys(args: argparse.Namespace) -> int:
    from policy_runtime.curve import AUTHORIZED_DIR, generate_keys

    written = generate_keys(args.out, args.client or ["robot"], force=args.force)
    for path in written:
        print(path)
    print(f"server: --curve-secret {args.out / 'server.key_secret'} --curve-clients {args.out / AUTHORIZED_DIR}; "
          f"copy {args.out / 'server.key'} and a client's *.key_secret to the robot")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return run_command("policy-runtime", lambda: {"serve": _serve, "check": _check, "keys": _keys}[args.cmd](args))


if __name__ == "__main__":
    sys.exit(main())
