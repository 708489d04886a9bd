"""A checkpoint as an actor: observations in, action chunks out (raw units, clipped to the action bounds)."""

from __future__ import annotations

import numpy as np
import torch

from policy_runtime.contract import PolicySpec
from sim_trainer.models.interface import FlowPolicy
from sim_trainer.models.precision import autocast


class ChunkPolicy:
    def __init__(self, model: FlowPolicy, spec: PolicySpec, num_steps: int | None = None, device: str = "cpu",
                 precision: str = "fp32"):
        self.model, self.spec, self.precision = model.to(device).eval(), spec, precision
        self.device = torch.device(device)
        self.num_steps = num_steps or model.cfg.num_steps
        self.text = model.tokenize([spec.instruction]).to(self.device)
        self.low = torch.tensor(spec.action_low, device=self.device)
        self.high = torch.tensor(spec.action_high, device=self.device)

    @property
    def horizon(self) -> int:
        return self.model.cfg.horizon

    @property
    def exec_steps(self) -> int:
        return self.model.cfg.exec_steps

    @torch.no_grad()
    def act(self, obs: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """obs: {"state": [B, S], "images": {cam: uint8 [B, H, W, 3]}} -> chunk [B, H, A]."""
        state = obs["state"].to(self.device).float()
        b = state.shape[0]
        images = {k: v.to(self.device) for k, v in obs["images"].items()}
        noise = torch.randn((b, self.horizon, self.spec.action_dim), generator=generator).to(self.device)
        text = self.text.expand(b, -1)
        with autocast(self.precision, self.device):
            chunk = self.model.sample_actions(images, state, text, noise, self.num_steps).float()
        return torch.maximum(torch.minimum(chunk, self.high), self.low)


class BackendPolicy:
    """A policy_runtime backend (e.g. ONNX Runtime on an export) as an actor for sim evaluation."""

    def __init__(self, backend, spec: PolicySpec, exec_steps: int):
        self.backend, self.spec, self.exec_steps = backend, spec, exec_steps
        self._next_id = 0

    @classmethod
    def from_export(cls, export_dir: str, threads: int = 0) -> BackendPolicy:
        import json
        from pathlib import Path

        from policy_runtime.backends.onnx_backend import OnnxBackend, OnnxOptions

        backend = OnnxBackend(export_dir, OnnxOptions(providers=("CPUExecutionProvider",), intra_op_threads=threads))
        manifest = json.loads((Path(export_dir) / "manifest.json").read_text())
        return cls(backend, PolicySpec.from_dict(manifest["spec"]), int(manifest["exec_steps"]))

    def act(self, obs: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        from policy_runtime.protocol import InferRequest

        state = obs["state"].cpu().numpy().astype("float32")
        images = {k: v.cpu().numpy() for k, v in obs["images"].items()}
        seeds = torch.randint(0, 2**31 - 1, (state.shape[0],), generator=generator).tolist()
        reqs = []
        for i, seed in enumerate(seeds):
            self._next_id += 1
            reqs.append(InferRequest(request_id=self._next_id, t_capture=0.0, images={k: v[i] for k, v in
                                                                                        images.items()},
                                     state=state[i], noise_seed=int(seed)))
        results = self.backend.infer_batch(reqs)
        errors = [r.error for r in results if r.error is not None]
        if errors:
            raise RuntimeError(f"backend refused a simulated observation: {errors[0]}")
        return torch.as_tensor(np.stack([r.actions for r in results]))
