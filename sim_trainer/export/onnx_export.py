"""Export a checkpoint's flow sampler to one ONNX graph: prefix encoding + K unrolled Euler steps.

The graph takes the raw observation and the initial noise (randomness is an explicit input: exporters
freeze random ops into constants) and returns the raw (unnormalised) action chunk; normalisation is
inside the graph. Python loops over the fixed K unroll at trace time, so the graph has no Loop/If.
The batch dimension is dynamic (the server batches requests); everything else is static.
The manifest records the contract a client checks at connect, and the parity against PyTorch measured
at export time; an export whose parity exceeds the tolerance is refused.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from policy_runtime.artifacts import atomic_write_text, build_and_publish, claim_output_dir
from policy_runtime.contract import (
    ACTIONS_OUTPUT,
    MANIFEST_FILE,
    NORM_STATS_FILE,
    ControllerSemantics,
    build_manifest,
    graph_input_names,
)
from sim_trainer.errors import UserError
from sim_trainer.models.backbones import manifest_text
from sim_trainer.models.checkpoint import LoadedPolicy, file_sha256, load_checkpoint
from sim_trainer.models.interface import FlowPolicy

OPSET = 17
PARITY_TOLERANCE = 1e-4  # max |onnx - torch| in raw action units, fp32 on CPU
# K is unrolled: graph size and export time grow with it (1-4 are the fast ones); beyond this it is a typo
# (--steps 1000000000 once took 3.3 GB in 5 s).
MAX_EXPORT_STEPS = 64
EXTERNAL_DATA_FILE, TOKENIZER_FILE = "policy.onnx.data", "tokenizer.json"
# protobuf cannot hold a model over 2 GiB: above this the weights go to EXTERNAL_DATA_FILE beside the graph
EXTERNAL_DATA_BYTES = 1 << 30
# the manifest last: see _publish; the weights file and the tokenizer only where the export has them
EXPORT_FILES = ("policy.onnx", EXTERNAL_DATA_FILE, TOKENIZER_FILE, NORM_STATS_FILE, MANIFEST_FILE)


class UnrolledSampler(torch.nn.Module):
    """(images..., state, text, noise) -> actions, with K fixed at construction."""

    def __init__(self, model: FlowPolicy, num_steps: int, cameras: list[str]):
        super().__init__()
        self.model, self.num_steps = model, num_steps
        self.cameras = cameras

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        n = len(self.cameras)
        images = dict(zip(self.cameras, inputs[:n], strict=True))
        state, text, noise = inputs[n:]
        return self.model.sample_actions(images, state, text, noise, self.num_steps)


def example_inputs(loaded: LoadedPolicy, batch: int, seed: int) -> list[torch.Tensor]:
    cfg, spec = loaded.model.cfg, loaded.spec
    g = torch.Generator().manual_seed(seed)
    images = [torch.randint(0, 256, (batch, c.height, c.width, 3), generator=g, dtype=torch.uint8)
              for c in spec.cameras]
    with torch.no_grad():  # states drawn around the training distribution
        state = loaded.model.state_norm.inverse(torch.randn(batch, spec.state_dim, generator=g))
    text = loaded.model.tokenize([spec.instruction]).expand(batch, -1).contiguous()
    noise = torch.randn(batch, cfg.horizon, spec.action_dim, generator=g)
    return [*images, state, text, noise]


@dataclass
class ExportResult:
    out: Path
    manifest: dict


def export_onnx(ckpt: str | Path, out: str | Path, num_steps: int, force: bool = False) -> ExportResult:
    """Export `ckpt` with K=`num_steps` into `out`.

    Everything is checked before any work, the export is built in a directory beside `out` and moved in
    at the end, so a failure (refused parity, an exception, Ctrl-C) leaves `out` exactly as it was.
    An existing export in `out` is replaced only with `force`.
    """
    if type(num_steps) is not int or not 1 <= num_steps <= MAX_EXPORT_STEPS:
        raise UserError(f"--steps must be at least 1 and at most {MAX_EXPORT_STEPS} (each step unrolls another "
                        f"copy of the action expert into the graph), got {num_steps}")
    ckpt, out = Path(ckpt), Path(out)
    loaded = load_checkpoint(ckpt)
    if not getattr(loaded.model, "state_table_exact", True):
        raise UserError(f"{ckpt}: this pi0.5 tokenizer does not split the prompt at the state's numbers, so the "
                        "state prompt cannot be part of the graph; serve the checkpoint with --backend torch")
    if len({(c.height, c.width) for c in loaded.spec.cameras}) > 1:
        raise UserError("cameras of different sizes are not supported by the exporter")
    created = not os.path.lexists(out)  # (os.path, unlike Path, answers False for a name too long)
    out = claim_output_dir(out, force=force, inputs=(ckpt,), what="export directory")
    if (out / "config.json").is_file():
        raise UserError(f"{out} holds a checkpoint (config.json); an export never replaces a checkpoint's files, "
                        "choose another --out")
    manifest = build_and_publish(out, created, "export", lambda staging: _build(loaded, ckpt, staging, num_steps),
                                 _publish)
    return ExportResult(out, manifest)


def _build(loaded: LoadedPolicy, ckpt: Path, staging: Path, num_steps: int) -> dict:
    """Write policy.onnx, norm_stats.json and manifest.json into `staging`; returns the manifest."""
    model = loaded.model.eval()
    cameras = [c.name for c in loaded.spec.cameras]  # a backbone's unused image slots stay masked in the graph
    names = graph_input_names(cameras)
    sampler = UnrolledSampler(model, num_steps, cameras).eval()
    onnx_path = staging / "policy.onnx"
    worst, ir_version = _export_and_verify(sampler, loaded, names, onnx_path)
    if not worst <= PARITY_TOLERANCE:
        raise UserError(f"ONNX output differs from PyTorch by {worst:.2e} > {PARITY_TOLERANCE:.0e}; export refused")
    # norm_stats.json travels byte for byte, so its sha256 can be recomputed by any client.
    shutil.copyfile(ckpt / NORM_STATS_FILE, staging / NORM_STATS_FILE)
    if manifest_text(model, loaded.spec.instruction) is not None:  # the backbone's own tokenizer travels with it
        shutil.copyfile(ckpt / TOKENIZER_FILE, staging / TOKENIZER_FILE)
    norm = json.loads((staging / NORM_STATS_FILE).read_text())
    manifest = _manifest(loaded, ckpt, onnx_path, staging, num_steps, worst, ir_version, norm)
    atomic_write_text(staging / MANIFEST_FILE, json.dumps(manifest, indent=2))
    return manifest


def _publish(staging: Path, out: Path) -> None:
    """Move the built export into `out`. The old manifest goes first and the new one comes last, so `out`
    never holds a manifest that describes other files (a reader sees the old export, none, or the new one)."""
    (out / MANIFEST_FILE).unlink(missing_ok=True)
    for name in EXPORT_FILES:
        if (staging / name).exists():
            os.replace(staging / name, out / name)
    fd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _export_and_verify(sampler: UnrolledSampler, loaded: LoadedPolicy, names: list[str], tmp: Path,
                       parity_batches: int = 4) -> tuple[float, int]:
    """Export to `tmp`, check the graph, and return (max |onnx - torch|, IR version)."""
    import onnx
    import onnxruntime as ort

    # The Python loop over the fixed K is meant to unroll at trace time; the tracer warns about exactly that.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(sampler, tuple(example_inputs(loaded, 1, 0)), str(tmp), input_names=names,
                          output_names=[ACTIONS_OUTPUT], opset_version=OPSET, dynamo=False,
                          dynamic_axes={n: {0: "batch"} for n in [*names, ACTIONS_OUTPUT]})
    graph = onnx.load(str(tmp))
    if sum(len(t.raw_data) for t in graph.graph.initializer) > EXTERNAL_DATA_BYTES:
        # one weights file beside the graph (ONNX Runtime finds it relative to policy.onnx)
        onnx.save_model(graph, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=EXTERNAL_DATA_FILE, size_threshold=1024)
    onnx.checker.check_model(str(tmp))  # by path: also for a graph whose weights are external
    graph = onnx.load(str(tmp), load_external_data=False)
    control_flow = sorted({n.op_type for n in graph.graph.node} & {"Loop", "If", "Scan"})
    if control_flow:
        raise RuntimeError(f"exported graph contains control flow {control_flow}; the unroll failed")

    # Parity against PyTorch on fresh inputs, batch 1 and a larger batch.
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    worst = 0.0
    for i in range(parity_batches):
        inputs = example_inputs(loaded, 1 if i % 2 == 0 else 3, seed=1000 + i)
        with torch.no_grad():
            ref = sampler(*inputs).numpy()
        got = session.run([ACTIONS_OUTPUT], {n: t.numpy() for n, t in zip(names, inputs, strict=True)})[0]
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst, int(graph.ir_version)


def _manifest(loaded: LoadedPolicy, ckpt: Path, onnx_path: Path, out: Path, num_steps: int, worst: float,
              ir_version: int, norm: dict) -> dict:
    import onnx

    cfg, spec = loaded.model.cfg, loaded.spec
    data = out / EXTERNAL_DATA_FILE
    provenance = {
        **({"model_data": {"file": data.name, "sha256": file_sha256(data)}} if data.exists() else {}),
        "checkpoint": {"name": ckpt.name, "weights_sha256": file_sha256(ckpt / "model.safetensors")},
        "onnx": {"opset": OPSET, "ir_version": ir_version, "exporter": "torch.onnx (TorchScript)",
                 "torch": torch.__version__, "onnx": onnx.__version__},
        "parity": {"max_abs_err": worst, "tolerance": PARITY_TOLERANCE, "precision": "fp32",
                   "provider": "CPUExecutionProvider", "machine": platform.platform()},
    }
    return build_manifest(spec, ControllerSemantics.of(spec), model_file=onnx_path.name,
                          model_sha256=file_sha256(onnx_path), horizon=cfg.horizon, exec_steps=cfg.exec_steps,
                          num_steps=num_steps, max_text_len=cfg.max_text_len, norm_stats=norm,
                          norm_sha256=file_sha256(out / NORM_STATS_FILE), extra=provenance,
                          text=manifest_text(loaded.model, spec.instruction))
