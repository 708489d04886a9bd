"""PyTorch backend: serves a sim_trainer checkpoint directly (reference for parity, and a GPU path before export).

This is the one runtime module allowed to import torch and sim_trainer. It builds its inputs with the same
numpy code as the ONNX backend, so identical requests (same noise_seed) give the same chunks on both.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from policy_runtime.backends import ChunkResult
from policy_runtime.backends.common import NoiseSource, batch_inputs, finish, normalisation_sha256
from policy_runtime.contract import (
    NORM_STATS_FILE,
    RUNTIME_CLIPS_ACTIONS,
    ControllerSemantics,
    build_manifest,
    contract_from_manifest,
    graph_input_names,
    zero_feeds,
)
from policy_runtime.errors import UserError
from policy_runtime.export_dir import file_sha256
from policy_runtime.protocol import Contract, InferRequest


@dataclass(frozen=True)
class TorchOptions:
    device: str = "cpu"
    cuda_graph: bool = False  # capture one CUDA graph per batch size (CUDA devices only)
    num_steps: int | None = None  # default: the checkpoint's configured K
    warmup_runs: int = 2
    seed: int = 0
    clip_actions: bool = RUNTIME_CLIPS_ACTIONS
    rtc_max_weight: float = 5.0  # beta of guided real-time chunking (requests with prev_chunk + delay_steps)


class TorchBackend:
    name = "torch"

    def __init__(self, ckpt_dir: str | Path, options: TorchOptions = TorchOptions()):
        from sim_trainer.errors import UserError as TrainerUserError
        from sim_trainer.models.checkpoint import load_checkpoint

        self.options = options
        self.device = torch.device(options.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device {options.device} requested but CUDA is not available")
        if options.cuda_graph and self.device.type != "cuda":
            raise UserError("CUDA-graph capture needs a CUDA device")
        from sim_trainer.models.backbones import manifest_text

        try:
            loaded = load_checkpoint(ckpt_dir, map_location="cpu")
        except TrainerUserError as e:
            raise UserError(str(e)) from None
        self.model = loaded.model.to(self.device).eval()
        cfg, spec = self.model.cfg, loaded.spec
        self.num_steps = options.num_steps or cfg.num_steps
        # The contract an export of this checkpoint would have: the same manifest, read the same way.
        norm_file = Path(ckpt_dir) / NORM_STATS_FILE
        manifest = build_manifest(
            spec, ControllerSemantics.of(spec), model_file="model.safetensors",
            model_sha256=file_sha256(Path(ckpt_dir) / "model.safetensors"), horizon=cfg.horizon,
            exec_steps=cfg.exec_steps, num_steps=self.num_steps, max_text_len=cfg.max_text_len, norm_stats={},
            norm_sha256=normalisation_sha256(norm_file), extra={},
            text=manifest_text(self.model, spec.instruction))
        provider = str(self.device) + (" (cuda graph)" if options.cuda_graph else "")
        self._contract = replace(contract_from_manifest(manifest, self.name, provider, where=str(ckpt_dir),
                                                        clip_actions=options.clip_actions), rtc=True)
        self.noise = NoiseSource(options.seed, (cfg.horizon, spec.action_dim))
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = {}
        self.warmup_ms = self._warmup()

    def contract(self) -> Contract:
        return self._contract

    def _forward(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        n = len(self._contract.cameras)
        images = {c.name: t for c, t in zip(self._contract.cameras, tensors[:n], strict=True)}
        state, text, noise = tensors[n:]
        return self.model.sample_actions(images, state, text, noise, self.num_steps)

    def _graph_for(self, tensors: list[torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]:
        """Capture (once per batch size) the whole sampler into a CUDA graph with static input buffers."""
        b = tensors[0].shape[0]
        if b not in self._graphs:
            static = [t.clone() for t in tensors]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    self._forward(static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._forward(static)
            self._graphs[b] = (graph, static, out)
        return self._graphs[b]

    @torch.inference_mode()
    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        names = graph_input_names([c.name for c in self._contract.cameras])
        tensors = [torch.from_numpy(np.ascontiguousarray(feeds[k])).to(self.device) for k in names]
        if not self.options.cuda_graph:
            return self._forward(tensors).float().cpu().numpy()
        graph, static, out = self._graph_for(tensors)
        for dst, src in zip(static, tensors, strict=True):
            dst.copy_(src)
        graph.replay()
        return out.float().cpu().numpy()

    def _warmup(self) -> float:
        feeds = zero_feeds(self._contract, 1)
        t0 = time.perf_counter()
        for _ in range(self.options.warmup_runs):
            self.run(feeds)
        return (time.perf_counter() - t0) * 1e3

    def infer_batch(self, requests: Sequence[InferRequest]) -> list[ChunkResult]:
        """Plain requests run as one batch; those with prev_chunk + delay_steps get guided RTC one by one."""
        rtc = [i for i, r in enumerate(requests) if r.prev_chunk is not None and r.delay_steps is not None]
        out: list[ChunkResult | None] = [None] * len(requests)
        plain = [i for i in range(len(requests)) if i not in rtc]
        if plain:
            chunks = finish(self.run(batch_inputs([requests[i] for i in plain], self._contract, self.noise)),
                            self._contract)
            for i, chunk in zip(plain, chunks, strict=True):
                out[i] = chunk
        for i in rtc:
            (chunk,) = finish(self._run_rtc(requests[i]), self._contract)
            chunk.rtc_applied = chunk.error is None
            out[i] = chunk
        return [c for c in out if c is not None]

    @torch.inference_mode(False)
    def _run_rtc(self, r: InferRequest) -> np.ndarray:
        from sim_trainer.models.rtc import guided_denoise, prefix_weights

        c = self._contract
        feeds = batch_inputs([r], c, self.noise)
        names = graph_input_names([cam.name for cam in c.cameras])
        t = [torch.from_numpy(np.ascontiguousarray(feeds[k])).to(self.device) for k in names]
        n = len(c.cameras)
        assert r.prev_chunk is not None and r.delay_steps is not None
        prev = np.zeros((c.horizon, c.action_dim), np.float32)
        prev[: len(r.prev_chunk)] = r.prev_chunk
        weights = prefix_weights(c.horizon, r.delay_steps, c.exec_steps)
        weights[len(r.prev_chunk):] = 0.0  # no target beyond the leftover the client sent
        with torch.no_grad():
            cache = self.model.encode_prefix(dict(zip([cam.name for cam in c.cameras], t[:n], strict=True)),
                                             t[n], t[n + 1])
            leftover = self.model.action_norm(torch.from_numpy(prev).to(self.device)[None])
        x = guided_denoise(self.model, cache, t[n + 2], self.num_steps, leftover, weights, self.options.rtc_max_weight)
        with torch.no_grad():
            return self.model.action_norm.inverse(x).float().cpu().numpy()

    def info(self) -> dict:
        return {"provider": self._contract.provider, "device": str(self.device), "cuda_graph": self.options.cuda_graph,
                "warmup_ms": round(self.warmup_ms, 1), "torch": torch.__version__}

    def close(self) -> None:
        self._graphs.clear()
