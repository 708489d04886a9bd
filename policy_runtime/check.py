"""`policy-runtime check`: re-verify an export on the machine that will serve it, before a robot depends on it.

The manifest's parity was measured torch-vs-ORT on the exporting machine; here there is no torch, so the
check is: hash, session creation on the provider actually used, determinism (same inputs and noise twice),
batch independence (row 0 of a batch of 2 equals the batch-1 result), finite outputs, latency, output range.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from policy_runtime.backends.onnx_backend import OnnxBackend, OnnxOptions
from policy_runtime.contract import graph_feeds, instruction_tokens

DETERMINISM_TOL = 1e-6
BATCH_TOL = 1e-4  # same order as the exporter's parity tolerance


@dataclass
class CheckReport:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _inputs(backend: OnnxBackend, batch: int, seed: int) -> dict[str, np.ndarray]:
    c, m = backend.contract(), backend.export.manifest
    rng = np.random.default_rng(seed)
    images = {cam.name: rng.integers(0, 256, (batch, cam.height, cam.width, 3), dtype=np.uint8) for cam in c.cameras}
    stats = m.get("normalisation", {}).get("stats", {}).get("state", {})
    mean = np.asarray(stats.get("mean", np.zeros(c.state_dim)), np.float32)
    std = np.asarray(stats.get("std", np.ones(c.state_dim)), np.float32)
    if mean.shape != (c.state_dim,) or std.shape != (c.state_dim,):
        mean, std = np.zeros(c.state_dim, np.float32), np.ones(c.state_dim, np.float32)
    return graph_feeds(images, (mean + std * rng.standard_normal((batch, c.state_dim))).astype(np.float32),
                       np.tile(instruction_tokens(c, c.default_instruction), (batch, 1)),
                       rng.standard_normal((batch, c.horizon, c.action_dim), dtype=np.float32))


def check_export(path: str | Path, options: OnnxOptions | None = None, runs: int = 10) -> CheckReport:
    """Raises UserError for a missing/corrupt export; returns a report whose `problems` are real failures."""
    backend = OnnxBackend(path, options or OnnxOptions())
    c, m = backend.contract(), backend.export.manifest
    r = CheckReport()
    r.lines.append(f"export {path}: manifest v{m['version']}, {backend.export.model_path.name} sha256 "
                   f"{c.model_sha256[:16]}... verified")
    r.lines.append(f"provider in use: {backend.provider} (session providers {backend.providers}; available "
                   f"{backend.info()['available']}); warm-up {backend.warmup_ms:.1f} ms")
    r.lines.append(f"contract: horizon {c.horizon}, exec {c.exec_steps}, action dim {c.action_dim}, K {c.num_steps}, "
                   f"state {c.state_dim}, cameras {[f'{x.name} {x.height}x{x.width}' for x in c.cameras]}, "
                   f"{c.control_hz:g} Hz")
    feeds = _inputs(backend, 1, seed=0)
    a, b = backend.run(feeds), backend.run(feeds)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        r.problems.append("the model produced NaN/Inf actions")
        return r
    diff = float(np.abs(a - b).max())
    r.lines.append(f"determinism: max |run1 - run2| = {diff:.2e} with fixed noise")
    if diff > DETERMINISM_TOL:
        r.problems.append(f"two runs with identical inputs differ by {diff:.2e} > {DETERMINISM_TOL:.0e}")
    pair = {k: np.concatenate([v, _inputs(backend, 1, seed=1)[k]]) for k, v in feeds.items()}
    batch_diff = float(np.abs(backend.run(pair)[:1] - a).max())
    r.lines.append(f"batch independence: max |batch2[0] - batch1| = {batch_diff:.2e}")
    if batch_diff > BATCH_TOL:
        r.problems.append(f"row 0 of a batch of 2 differs from the batch-1 result by {batch_diff:.2e} > {BATCH_TOL}")
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        backend.run(feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    r.lines.append(f"latency (batch 1, {runs} runs): median {np.median(times):.2f} ms, max {max(times):.2f} ms")
    low, high = np.asarray(c.action_low), np.asarray(c.action_high)
    outside = float(((a < low) | (a > high)).mean())
    r.lines.append(f"output range [{a.min():.3f}, {a.max():.3f}] raw; bounds [{low.min():g}, {high.max():g}]; "
                   f"{100 * outside:.1f}% of values would be clipped")
    parity = m.get("parity", {})
    if parity:
        r.lines.append(f"export-time parity (torch vs ORT on {parity.get('provider')}): max abs err "
                       f"{parity.get('max_abs_err')} (tolerance {parity.get('tolerance')})")
    backend.close()
    return r
