"""ONNX Runtime backend: the production path (no torch, no sim_trainer).

onnxruntime-gpu silently falls back to the CPU when CUDA/TensorRT cannot start, so the provider actually
in use is read back from the session, reported in the contract, and checked when a GPU is required.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import onnxruntime as ort

from policy_runtime.backends import ChunkResult
from policy_runtime.backends.common import NoiseSource, batch_inputs, finish
from policy_runtime.contract import (
    ACTIONS_OUTPUT,
    RUNTIME_CLIPS_ACTIONS,
    TOKENIZER,
    contract_from_manifest,
    graph_shapes,
    instruction_tokens,
    zero_feeds,
)
from policy_runtime.errors import UserError
from policy_runtime.export_dir import ExportDir, load_export
from policy_runtime.protocol import Contract, InferRequest

log = logging.getLogger("policy_runtime.onnx")

TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
GPU_PROVIDERS = (TRT, CUDA)
DEFAULT_PROVIDERS = (TRT, CUDA, CPU)


@dataclass(frozen=True)
class OnnxOptions:
    providers: tuple[str, ...] = DEFAULT_PROVIDERS  # preference order, filtered to what this build offers
    require_gpu: bool = False                       # refuse to serve on the CPU (no silent fallback)
    intra_op_threads: int = 0                       # 0 = ORT default (one per physical core)
    allow_spinning: bool = True
    warmup_runs: int = 3
    warmup_batch_sizes: tuple[int, ...] = (1,)
    iobinding: bool = True                          # only takes effect on a GPU provider
    seed: int = 0                                   # the server's noise stream for requests without noise_seed
    clip_actions: bool = RUNTIME_CLIPS_ACTIONS
    trt_cache_dir: str | None = None                # default: <export>/trt_cache


def onnxruntime_distributions() -> list[str]:
    """The installed distributions that provide the `onnxruntime` package (onnxruntime, onnxruntime-gpu, ...)."""
    return sorted(set(metadata.packages_distributions().get("onnxruntime", [])))


@functools.cache
def warn_if_onnxruntime_mixed() -> None:
    """Two builds in one environment overwrite each other's files: what runs is whichever wrote last, in part."""
    dists = onnxruntime_distributions()
    if len(dists) > 1:
        log.warning("%s are installed together and overwrite each other's files; keep one: for the GPU build "
                    "run scripts/install_gpu_runtime.sh, for the CPU build pip uninstall -y %s && pip install "
                    "onnxruntime", " and ".join(dists), " ".join(dists))


def choose_providers(requested: Sequence[str], available: Sequence[str], require_gpu: bool) -> list[str]:
    """Requested providers in order, keeping those this onnxruntime build offers; GPU-only when required."""
    known = set(ort.get_all_providers())
    unknown = [p for p in requested if p not in known]
    if unknown:
        raise UserError(f"unknown execution provider(s) {unknown}; known: {sorted(known)}")
    chosen = [p for p in requested if p in available]
    if require_gpu:
        chosen = [p for p in chosen if p in GPU_PROVIDERS]
        if not chosen:
            raise UserError(f"a GPU provider is required but this onnxruntime offers only {list(available)} "
                            "(install onnxruntime-gpu, not onnxruntime)")
    if not chosen:
        raise UserError(f"none of the providers {list(requested)} is available (available: {list(available)})")
    return chosen


def _provider_options(name: str, export: ExportDir, opts: OnnxOptions) -> dict:
    if name == TRT:
        cache = opts.trt_cache_dir or str(export.path / "trt_cache")
        try:
            Path(cache).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the TensorRT engine cache {cache}: {e.strerror}") from None
        return {"trt_engine_cache_enable": "True", "trt_engine_cache_path": cache, "trt_timing_cache_enable": "True",
                "trt_timing_cache_path": cache, "trt_fp16_enable": "False"}
    if name == CUDA:
        return {"cudnn_conv_algo_search": "EXHAUSTIVE", "do_copy_in_default_stream": "True"}
    return {}


class OnnxBackend:
    """Serves one export directory with an ONNX Runtime session."""

    name = "onnxruntime"

    def __init__(self, export_dir: str | Path, options: OnnxOptions = OnnxOptions()):
        warn_if_onnxruntime_mixed()
        self.options = options
        self.export = load_export(export_dir)
        m = self.export.manifest
        providers = choose_providers(options.providers, ort.get_available_providers(), options.require_gpu)
        so = ort.SessionOptions()
        so.intra_op_num_threads = max(0, options.intra_op_threads)
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.allow_spinning else "0")
        if options.require_gpu:
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        try:
            self.session = ort.InferenceSession(str(self.export.model_path), sess_options=so,
                                                providers=[(p, _provider_options(p, self.export, options))
                                                           for p in providers])
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
            raise UserError(f"export {self.export.path}: onnxruntime cannot load {self.export.model_path.name} "
                            f"({str(e).strip().splitlines()[0][:200]})") from None
        self.providers = list(self.session.get_providers())
        self.provider = self.providers[0]
        if options.require_gpu and self.provider not in GPU_PROVIDERS:
            raise UserError(f"a GPU provider was required but the session runs on {self.provider} "
                            f"(asked for {providers}); check the CUDA/cuDNN install")
        if self.provider != providers[0]:
            log.warning("asked for %s first but the session runs on %s", providers[0], self.provider)
        self._contract = contract_from_manifest(m, self.name, self.provider, where=str(self.export.path),
                                                clip_actions=options.clip_actions)
        self._check_graph(m)
        self.use_iobinding = options.iobinding and self.provider in GPU_PROVIDERS
        self.noise = NoiseSource(options.seed, (self._contract.horizon, self._contract.action_dim))
        self.warmup_ms = self._warmup()

    def _check_graph(self, m: dict) -> None:
        c = self._contract
        shapes = graph_shapes(c)
        want = set(shapes) - {ACTIONS_OUTPUT}
        have = {i.name for i in self.session.get_inputs()}
        if want != have:
            raise UserError(f"export {self.export.path}: graph inputs {sorted(have)} do not match the manifest's "
                            f"{sorted(want)}")
        if [o.name for o in self.session.get_outputs()] != [ACTIONS_OUTPUT]:
            raise UserError(f"export {self.export.path}: graph output is not {ACTIONS_OUTPUT!r}")
        for node in (*self.session.get_inputs(), *self.session.get_outputs()):
            self._check_dims(node.name, node.shape, shapes[node.name])
        tokens = m["text"].get("tokens")
        if tokens is not None and instruction_tokens(c, c.default_instruction).tolist() != list(tokens):
            raise UserError(f"export {self.export.path}: the manifest's instruction tokens do not follow the "
                            f"{'tokenizer' if c.tokenizer_file else TOKENIZER} rule this runtime implements")

    def _check_dims(self, name: str, graph: list, manifest: tuple[int, ...]) -> None:
        """Fixed graph dimensions (after the batch axis) must equal the manifest's; symbolic ones are free."""
        dims = list(graph or [])[1:]
        if len(dims) != len(manifest) or any(isinstance(g, int) and g != m
                                             for g, m in zip(dims, manifest, strict=True)):
            raise UserError(f"export {self.export.path}: graph {name} has shape {list(graph or [])}, the manifest "
                            f"says [batch, {', '.join(map(str, manifest))}]")

    def _warmup(self) -> float:
        """Run dummy batches so first-call costs (allocations, cuDNN search, TRT builds) happen before serving."""
        c = self._contract
        t0 = time.perf_counter()
        for b in self.options.warmup_batch_sizes:
            feeds = zero_feeds(c, b)
            for _ in range(self.options.warmup_runs):
                self.run(feeds)
        return (time.perf_counter() - t0) * 1e3

    def contract(self) -> Contract:
        return self._contract

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Raw graph output [B, H, A] (unclipped)."""
        if not self.use_iobinding:
            return self.session.run([ACTIONS_OUTPUT], feeds)[0]
        binding = self.session.io_binding()  # inputs copied once to the device, output allocated there
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        binding.bind_output(ACTIONS_OUTPUT, "cuda", 0)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def infer_batch(self, requests: Sequence[InferRequest]) -> list[ChunkResult]:
        return finish(self.run(batch_inputs(requests, self._contract, self.noise)), self._contract)

    def info(self) -> dict:
        return {"provider": self.provider, "providers": self.providers, "available": ort.get_available_providers(),
                "iobinding": self.use_iobinding, "warmup_ms": round(self.warmup_ms, 1),
                "intra_op_threads": self.options.intra_op_threads, "onnxruntime": ort.__version__}

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]
