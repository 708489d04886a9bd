#!/usr/bin/env python
"""Batch-1 inference latency on the CPU: exported ONNX graphs (K denoising steps unrolled) vs PyTorch eager.

The checkpoint (--ckpt, or a randomly initialised one with --random-size: latency does not depend on the weights)
is exported with sim_trainer.export.onnx_export.export_onnx once per K in --steps, into a temporary directory.
Then, for one PickCube-shaped observation (the checkpoint's cameras, state and default instruction), each of these
is timed (batch 1, after warm-up):

- ORT backend:  policy_runtime.backends.onnx_backend.OnnxBackend(...).infer_batch([request]) on the CPU provider,
                i.e. what the server's worker calls: input assembly (tokenizer, noise draw) + session.run + the
                NaN check and clipping.
- ORT session:  the same backend's onnxruntime session, session.run(["actions"], feeds) with prebuilt feeds named
                as in the manifest (image.<camera>, state, text, noise): the graph alone.
- torch eager:  model.sample_actions(images, state, text, noise, K) under torch.inference_mode() with prebuilt
                tensors, for K=10 (the shipped checkpoint's default), the checkpoint's own default K, and every
                K in --steps.

Calls are interleaved in blocks (every configuration runs --block calls in turn, after 2 untimed calls) so that
background load drifts affect all configurations alike; percentiles pool all calls of a configuration.
--threads sets both torch.set_num_threads and ONNX Runtime's intra-op threads (default: all cores).

Issue target: ONNX K=4 at least 3x faster (p50) than eager with K=10 (the shipped checkpoint's default); the primary
figure uses the ORT backend path, the raw-session figure and the same-K (eager K=4) ratio are reported beside it.

Prints a Markdown section, then one line of JSON (the last line of stdout); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SPEEDUP_TARGET = 3.0
TARGET_ONNX_K, TARGET_EAGER_K = 4, 10

# PickCube-v1 RGB shapes of the shipped checkpoint (configs/sft_pushcube_rgb_small.yaml).
PICKCUBE_STATE_LAYOUT = (("agent/qpos", 9), ("agent/qvel", 9), ("extra/is_grasped", 1), ("extra/tcp_pose", 7),
                         ("extra/goal_pos", 3))
INSTRUCTION = "pick up the red cube and move it to the goal"


def random_checkpoint(out: Path, size: str, seed: int = 0, image_size: int = 64, num_steps: int = 10) -> Path:
    """A randomly initialised checkpoint with the shipped checkpoint's shapes (one camera, state 29, H=16, K=10)."""
    from policy_runtime.contract import CameraSpec, PolicySpec
    from sim_trainer.data.normalize import NormStats, Stats
    from sim_trainer.models.checkpoint import save_checkpoint
    from sim_trainer.models.config import ModelConfig
    from sim_trainer.models.flow_vla import FlowVLA

    torch.manual_seed(seed)
    state_dim = sum(n for _, n in PICKCUBE_STATE_LAYOUT)
    spec = PolicySpec(task="PickCube-v1", control_mode="pd_joint_delta_pos", obs_mode="rgb",
                      cameras=(CameraSpec("base_camera", image_size, image_size),), state_layout=PICKCUBE_STATE_LAYOUT,
                      action_dim=8, action_low=(-1.0,) * 8, action_high=(1.0,) * 8, control_hz=20.0,
                      instruction=INSTRUCTION)
    cfg = ModelConfig.from_size(size, camera_names=("base_camera",), image_size=image_size, state_dim=state_dim,
                                action_dim=8, horizon=16, exec_steps=8, num_steps=num_steps)
    rng = np.random.default_rng(seed)
    norm = NormStats(Stats.of(rng.normal(size=(256, state_dim))), Stats.of(rng.uniform(-1, 1, size=(256, 8))))
    save_checkpoint(out, FlowVLA(cfg, norm), spec, norm, info={"note": f"random {size} weights (benchmark)"})
    return out


def resolve_checkpoint(ckpt: str, random_size: str | None, tmp: Path, seed: int) -> tuple[Path, str]:
    """(checkpoint dir, description); exits with a one-line message when --ckpt is missing."""
    if random_size:
        path = random_checkpoint(tmp / f"random_{random_size}", random_size, seed)
        return path, f"randomly initialised `{random_size}` FlowVLA (PickCube-RGB shapes)"
    path = Path(ckpt)
    if not path.is_absolute() and not path.exists():  # a repo-relative default, run from another directory
        path = Path(__file__).resolve().parents[1] / path
    if not (path / "config.json").is_file():
        sys.exit(f"error: checkpoint {ckpt} not found (no config.json); pass --ckpt DIR, or --random-size SIZE "
                 "for a randomly initialised model")
    return path, f"`{path}`"


def stats_ms(seconds: list[float]) -> dict:
    a = np.asarray(seconds) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()),
            "min_ms": float(a.min()), "calls": int(a.size)}


def time_interleaved(configs: list[dict], calls: int, warmup: int, block: int) -> dict[str, list[float]]:
    for c in configs:
        print(f"[inference_latency] warm-up {c['name']} ...", file=sys.stderr)
        for _ in range(warmup):
            c["fn"]()
    times: dict[str, list[float]] = {c["name"]: [] for c in configs}
    for start in range(0, calls, block):
        n = min(block, calls - start)
        for c in configs:
            fn = c["fn"]
            fn()  # untimed: re-warm caches and thread pools after the previous configuration
            fn()
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                times[c["name"]].append(time.perf_counter() - t0)
            time.sleep(0.005)  # let the previous runtime's spinning worker threads go idle
        print(f"[inference_latency] {start + n}/{calls} calls per configuration", file=sys.stderr)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="checkpoints/pushcube_rgb_small", help="checkpoint directory")
    p.add_argument("--random-size", choices=("tiny", "small", "base"), default=None,
                   help="ignore --ckpt and use a randomly initialised model of this size (PickCube-RGB shapes, K=10)")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4], help="K values to export (default 1 2 4)")
    p.add_argument("--calls", type=int, default=200, help="timed calls per configuration (default 200)")
    p.add_argument("--warmup", type=int, default=20, help="untimed calls per configuration first (default 20)")
    p.add_argument("--block", type=int, default=25, help="calls per configuration per interleaving turn")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads and ORT intra-op threads (default: all cores)")
    p.add_argument("--no-raw-session", action="store_true", help="skip the raw ORT session rows")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.calls < 1 or args.warmup < 0 or args.block < 1 or min(args.steps) < 1 or (args.threads or 1) < 1:
        p.error("--calls, --block, --steps and --threads must be >= 1, --warmup >= 0")
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    steps = sorted(set(args.steps))
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    import onnxruntime as ort
    from common import command_line, machine_info

    from policy_runtime.backends.common import NoiseSource, batch_inputs
    from policy_runtime.backends.onnx_backend import CPU, OnnxBackend, OnnxOptions
    from policy_runtime.protocol import InferRequest
    from sim_trainer.export.onnx_export import export_onnx
    from sim_trainer.models.checkpoint import load_checkpoint
    from sim_trainer.models.tokenizer import tokenize

    backends = []
    with tempfile.TemporaryDirectory(prefix="inference_latency_") as tmp_name:
        tmp = Path(tmp_name)
        ckpt, ckpt_desc = resolve_checkpoint(args.ckpt, args.random_size, tmp, args.seed)
        loaded = load_checkpoint(ckpt)
        model, spec = loaded.model.eval(), loaded.spec
        default_k = model.cfg.num_steps
        eager_ks = sorted(set(steps) | {default_k, TARGET_EAGER_K})

        exports = {}
        for k in steps:
            print(f"[inference_latency] exporting K={k} ...", file=sys.stderr)
            t0 = time.perf_counter()
            res = export_onnx(ckpt, tmp / f"export_k{k}", k)
            exports[k] = {"dir": res.out, "export_s": time.perf_counter() - t0,
                          "parity_max_abs_err": res.manifest["parity"]["max_abs_err"],
                          "onnx_bytes": (res.out / res.manifest["model_file"]).stat().st_size}

        rng = np.random.default_rng(args.seed)
        images = {c.name: rng.integers(0, 256, (c.height, c.width, 3), dtype=np.uint8) for c in spec.cameras}
        with torch.no_grad():
            state = loaded.model.state_norm.inverse(torch.randn(1, spec.state_dim,
                                                                generator=torch.Generator().manual_seed(args.seed)))
        state_np = state[0].numpy().astype(np.float32)
        request = InferRequest(request_id=1, t_capture=0.0, images=images, state=state_np)

        configs: list[dict] = []
        try:
            for k in steps:
                backend = OnnxBackend(exports[k]["dir"], OnnxOptions(providers=(CPU,), intra_op_threads=threads,
                                                                     warmup_runs=2, seed=args.seed))
                backends.append(backend)
                configs.append({"name": f"ort_backend_k{k}", "runtime": "onnxruntime",
                                "path": "OnnxBackend.infer_batch", "k": k,
                                "fn": lambda b=backend: b.infer_batch([request])})
                if not args.no_raw_session:
                    feeds = batch_inputs([request], backend.contract(), NoiseSource(args.seed, (model.cfg.horizon,
                                                                                                spec.action_dim)))
                    configs.append({"name": f"ort_session_k{k}", "runtime": "onnxruntime", "path": "session.run",
                                    "k": k, "fn": lambda b=backend, f=feeds: b.session.run(["actions"], f)})
            t_images = {name: torch.from_numpy(a[None]) for name, a in images.items()}
            t_text = tokenize(spec.instruction, model.cfg.max_text_len)[None]
            t_noise = torch.randn((1, model.cfg.horizon, spec.action_dim),
                                  generator=torch.Generator().manual_seed(args.seed))

            def eager(k: int) -> None:
                with torch.inference_mode():
                    model.sample_actions(t_images, state, t_text, t_noise, k)

            for k in eager_ks:
                configs.append({"name": f"torch_eager_k{k}", "runtime": "torch", "path": "model.sample_actions",
                                "k": k, "fn": lambda k=k: eager(k)})
            times = time_interleaved(configs, args.calls, args.warmup, args.block)
        finally:
            for b in backends:
                b.close()

    rows = [{key: c[key] for key in ("name", "runtime", "path", "k")} | stats_ms(times[c["name"]]) for c in configs]
    by = {r["name"]: r for r in rows}

    def speedup(num: str, den: str) -> float | None:
        return by[num]["p50_ms"] / by[den]["p50_ms"] if num in by and den in by else None

    base = f"torch_eager_k{TARGET_EAGER_K}"
    for r in rows:
        r["speedup_vs_eager_k10"] = speedup(base, r["name"])
    target = {"target": SPEEDUP_TARGET, "onnx_k": TARGET_ONNX_K, "eager_k": TARGET_EAGER_K,
              "checkpoint_default_k": default_k,
              "speedup_backend": speedup(base, f"ort_backend_k{TARGET_ONNX_K}"),
              "speedup_session": speedup(base, f"ort_session_k{TARGET_ONNX_K}"),
              "speedup_same_k_backend": speedup(f"torch_eager_k{TARGET_ONNX_K}", f"ort_backend_k{TARGET_ONNX_K}")}
    target["met"] = None if target["speedup_backend"] is None else target["speedup_backend"] >= SPEEDUP_TARGET

    m = machine_info()
    params = model.num_parameters()
    cams = ", ".join(f"{c.name} {c.height}x{c.width}" for c in spec.cameras)
    print(f"## Inference latency, batch 1, CPU: ONNX Runtime vs PyTorch eager ({spec.task})\n")
    print(f"- command: `{command_line()}`")
    print(f"- date: {date}")
    print(f"- machine: {m['platform']}, {m['processor']}, {m['cpu_count']} CPUs, Python {m['python']}, "
          f"torch {m['torch']}, onnxruntime {ort.__version__}")
    print(f"- model: {ckpt_desc}, {model.cfg.size}, {params / 1e6:.2f} M parameters; cameras {cams}, state "
          f"{spec.state_dim}, H={model.cfg.horizon}, action dim {spec.action_dim}, default K={default_k}")
    print(f"- settings: {threads} thread(s) for torch and ORT intra-op (ORT CPUExecutionProvider, spinning "
          f"{'on' if OnnxOptions().allow_spinning else 'off'}), {args.calls} timed calls per row after "
          f"{args.warmup} warm-up, interleaved in blocks of {args.block}; fp32")
    print("- exports: " + "; ".join(f"K={k}: {e['export_s']:.1f} s, {e['onnx_bytes'] / 1e6:.1f} MB, parity "
                                   f"{e['parity_max_abs_err']:.1e}" for k, e in exports.items()) + "\n")
    print("| runtime | timed call | K | p50 (ms) | p99 (ms) | mean (ms) | min (ms) | "
          f"speedup vs eager K={TARGET_EAGER_K} |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        s = r["speedup_vs_eager_k10"]
        print(f"| {r['runtime']} | {r['path']} | {r['k']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
              f"{r['mean_ms']:.2f} | {r['min_ms']:.2f} | {'-' if s is None else f'{s:.2f}x'} |")
    print()
    if target["speedup_backend"] is None:
        print(f"- target: ONNX K={TARGET_ONNX_K} >= {SPEEDUP_TARGET:.0f}x faster than eager K={TARGET_EAGER_K}: "
              f"not measured (K={TARGET_ONNX_K} not in --steps)")
    else:
        note = "" if default_k == TARGET_EAGER_K else f" (note: this checkpoint's default K is {default_k})"
        sess = target["speedup_session"]
        print(f"- target: ONNX K={TARGET_ONNX_K} (ORT backend) vs eager K={TARGET_EAGER_K}{note}: "
              f"{target['speedup_backend']:.2f}x (raw session: {'-' if sess is None else f'{sess:.2f}x'}; "
              f"same K={TARGET_ONNX_K}: {target['speedup_same_k_backend']:.2f}x) -> target >= {SPEEDUP_TARGET:.0f}x "
              f"{'met' if target['met'] else 'NOT met'}")
    print()
    print(json.dumps({"benchmark": "inference_latency", "date": date, "command": command_line(), "machine": m,
                      "onnxruntime": ort.__version__, "checkpoint": str(ckpt) if not args.random_size else None,
                      "random_size": args.random_size, "model_size": model.cfg.size, "params": params,
                      "threads": threads, "calls": args.calls, "warmup": args.warmup, "block": args.block,
                      "exports": {str(k): {kk: v for kk, v in e.items() if kk != "dir"} for k, e in exports.items()},
                      "results": rows, "target": target}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
