#!/usr/bin/env python
"""GPU acceptance check in one command (`make gpu-check`): every GPU code path of the project, in a few minutes.

Parts, each in its own process (a crash or hang in one, e.g. a segfault in the simulator, does not stop the rest):

- environment:  GPU, driver, CUDA, torch, Vulkan ICD, ONNX Runtime providers, ManiSkill/SAPIEN, PhysX GPU library
- sim:          PushCube-v1 state and RGB env steps/s on physx_cuda (--num-envs envs), against the CPU path's
                figures in BENCHMARKS.md (on a host without CUDA: the CPU path itself, one env, briefly)
- grpo_seeding: a batched physx_cuda reset with repeated seeds: raw ManiSkill vs the project's GpuVecEnv, whose
                groups must start from identical states (GRPO's requirement)
- nccl:         an NCCL all-reduce under torchrun --nproc-per-node 1
- rl:           a few PPO + Flow-Noise updates of a shrunk copy of configs/rl_pushcube_rgb_gpu.yaml under torchrun:
                rollout and whole-update env steps/s, their fraction of the raw simulator, peak GPU memory
- inference:    the `base` model at batch 1: eager K=10, eager K=4, CUDA graphs K=4 (policy_runtime's torch
                backend), and ONNX Runtime's CUDA provider with IOBinding when onnxruntime-gpu is installed
- vla:          the tiny pi0 / pi0.5 fixtures' sample_actions (random weights), K=10 and K=4

A part that cannot run prints one line saying why (status "skip"); the exit code is 1 when anything expected
failed (status "fail": an exception, a timeout, a broken requirement), else 0. Without CUDA the parts that need
it are skipped, which is what `make test` exercises. With --expect-gpu (or when nvidia-smi exists) a missing CUDA
is itself a failure. Results: a Markdown table on stdout and in OUT/gpu_check.md, everything in OUT/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("environment", "sim", "grpo_seeding", "nccl", "rl", "inference", "vla")
NEEDS_CUDA = {"grpo_seeding": "physx_cuda batches envs in one process (physx_cpu builds one env per process)",
              "nccl": "NCCL runs on CUDA devices only",
              "rl": "the preset's physx_cuda envs"}
TIMEOUTS = {"environment": 60, "sim": 180, "grpo_seeding": 120, "nccl": 90, "rl": 330, "inference": 150, "vla": 120}
RGB_GPU_PRESET = ROOT / "configs" / "rl_pushcube_rgb_gpu.yaml"


@dataclass
class Row:
    item: str
    value: str
    status: str = "ok"  # ok | skip | fail | info
    data: dict = field(default_factory=dict)


@dataclass
class Context:
    out: str
    cuda: bool
    num_envs: int = 256
    sim_steps: int = 100
    rl_updates: int = 2
    calls: int = 50
    rl_on_cpu: bool = False
    model_size: str = "base"
    raw_rgb_steps_per_s: float | None = None  # from the sim part, for the RL part's fraction


def skip(reason: str) -> list[Row]:
    return [Row("-", reason, "skip")]


def sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def timed_ms(fn, calls: int, warmup: int, cuda: bool) -> dict:
    """p50/mean/min of `calls` calls of fn after `warmup`, synchronising the GPU around each call."""
    import numpy as np

    for _ in range(warmup):
        fn()
    sync(cuda)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        sync(cuda)
        times.append((time.perf_counter() - t0) * 1e3)
    a = np.asarray(times)
    return {"p50_ms": float(np.median(a)), "mean_ms": float(a.mean()), "min_ms": float(a.min()), "calls": calls}


def measure(ctx: Context, fn) -> dict:
    """timed_ms with the context's call count, and a shorter warm-up on a host without CUDA."""
    return timed_ms(fn, ctx.calls, 5 if ctx.cuda else 1, ctx.cuda)


def ms_row(item: str, stats: dict, base: dict | None = None) -> Row:
    text = f"p50 {stats['p50_ms']:.2f} ms, min {stats['min_ms']:.2f} ms ({stats['calls']} calls)"
    if base is not None:
        text += f", {base['p50_ms'] / stats['p50_ms']:.2f}x vs eager K=10"
    return Row(item, text, data=stats)


# ---------------------------------------------------------------------------------------------------- environment


def vulkan_icds() -> list[str]:
    """Vulkan ICD manifests the loader would find (explicit variables first, then the standard folders)."""
    explicit = os.environ.get("VK_DRIVER_FILES") or os.environ.get("VK_ICD_FILENAMES")
    if explicit:
        return [p for p in explicit.split(os.pathsep) if Path(p).is_file()]
    dirs = ["/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d", "/usr/local/share/vulkan/icd.d",
            "/usr/local/nvidia/share/vulkan/icd.d"]
    return sorted(str(p) for d in dirs if Path(d).is_dir() for p in Path(d).glob("*.json"))


def vulkan_problem() -> str | None:
    """Why SAPIEN cannot render here (no Vulkan loader, or no driver manifest), or None."""
    import ctypes.util

    bundled = False  # SAPIEN's wheel carries a loader of its own
    try:
        import sapien

        bundled = any((Path(sapien.__file__).parent / "vulkan_library").glob("libvulkan.so*"))
    except ImportError:
        pass
    if ctypes.util.find_library("vulkan") is None and not bundled:
        return "no Vulkan loader (libvulkan.so.1) found, SAPIEN cannot render"
    if not vulkan_icds():
        return "no Vulkan ICD manifest found, SAPIEN cannot render"
    return None


def physx_gpu_problem() -> str | None:
    """Why physx_cuda cannot start offline, or None: SAPIEN fetches its PhysX GPU library from GitHub at first use."""
    _, lib = physx_gpu_library()
    if lib is None or lib.is_file():
        return None
    return (f"PhysX GPU library missing at {lib}: SAPIEN downloads it at first use, which fails without network; "
            "bring it with the wheelhouse (scripts/wheelhouse.sh --physx-gpu ZIP, docs/gpu.md)")


def physx_gpu_library() -> tuple[str, Path | None]:
    """(SAPIEN's PhysX version, where its GPU library must be): SAPIEN downloads it at first use otherwise."""
    try:
        import sapien.physx
    except ImportError:
        return "", None
    version = sapien.physx.version()
    return version, Path.home() / ".sapien" / "physx" / version / "libPhysXGpu_64.so"


def nvidia_smi(query: str) -> str:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return ""
    res = subprocess.run([exe, f"--query-gpu={query}", "--format=csv,noheader,nounits", "-i", "0"],
                         capture_output=True, text=True, timeout=30)
    return res.stdout.strip() if res.returncode == 0 else ""


def part_environment(ctx: Context) -> list[Row]:
    import torch

    rows = [Row("python", sys.version.split()[0], "info"), Row("torch", torch.__version__, "info")]
    smi = nvidia_smi("name,driver_version")
    if torch.cuda.is_available():
        rows += [Row("GPU", torch.cuda.get_device_name(0), "info"),
                 Row("driver", smi.split(", ")[-1] if smi else "nvidia-smi not found", "info"),
                 Row("CUDA (torch build)", str(torch.version.cuda), "info")]
    else:
        expected = bool(smi) or os.environ.get("GPU_CHECK_EXPECT_GPU") == "1"
        rows.append(Row("CUDA", "not available to torch" + (f" although nvidia-smi sees {smi}" if smi else ""),
                        "fail" if expected else "skip"))
    icds, problem = vulkan_icds(), vulkan_problem()
    rows.append(Row("Vulkan", f"{problem}: RGB parts skipped (docs/gpu.md)" if problem else
                    "loader and ICD(s) " + ", ".join(Path(p).name for p in icds), "info"))
    try:
        import onnxruntime as ort

        rows.append(Row("ONNX Runtime", f"{ort.__version__}: {', '.join(ort.get_available_providers())}", "info"))
    except ImportError:
        rows.append(Row("ONNX Runtime", "not installed", "info"))
    for name in ("mani_skill", "sapien", "gymnasium", "zmq"):
        try:
            mod = __import__(name)
            version = getattr(mod, "__version__", "?")
            rows.append(Row(name, f"{version} ({Path(mod.__file__).parent})", "info"))
        except ImportError as e:
            rows.append(Row(name, f"not importable: {e}", "info"))
    version, lib = physx_gpu_library()
    if lib is not None:
        rows.append(Row("PhysX GPU library", f"{lib} ({'present' if lib.is_file() else 'missing'}; PhysX {version})",
                        "info"))
    return rows


# ------------------------------------------------------------------------------------------------------------ sim


def cpu_figures() -> dict[str, float]:
    """The CPU path's raw ManiSkill env steps/s from BENCHMARKS.md (section 4): state, and RGB with one camera."""
    text = (ROOT / "BENCHMARKS.md").read_text() if (ROOT / "BENCHMARKS.md").is_file() else ""
    out = {}
    m = re.search(r"\| state \| raw ManiSkill, zero actions \| ([\d.]+) \|", text)
    if m:
        out["state"] = float(m.group(1))
    m = re.search(r"about (\d+) steps/s raw", text)
    if m:
        out["rgb"] = float(m.group(1))
    return out


def raw_env(task: str, obs_mode: str, backend: str, num_envs: int):
    import gymnasium as gym
    import mani_skill.envs  # noqa: F401  (registers the tasks)

    return gym.make(task, num_envs=num_envs, obs_mode=obs_mode, control_mode="pd_joint_delta_pos",
                    sim_backend=backend, render_backend="gpu" if backend == "physx_cuda" else "cpu",
                    sensor_configs={"width": 64, "height": 64}, max_episode_steps=10**6)


def steps_per_s(obs_mode: str, backend: str, num_envs: int, steps: int) -> float:
    """Raw env steps/s (all envs) with zero actions, after 5 untimed steps; resets excluded."""
    import torch

    env = raw_env("PushCube-v1", obs_mode, backend, num_envs)
    try:
        env.reset(seed=list(range(num_envs)) if num_envs > 1 else 0)
        device = env.unwrapped.device
        action = torch.zeros((num_envs, *env.unwrapped.single_action_space.shape), device=device)
        for _ in range(5):
            env.step(action)
        sync(device.type == "cuda")
        t0 = time.perf_counter()
        for _ in range(steps):
            env.step(action)
        sync(device.type == "cuda")
        return steps * num_envs / (time.perf_counter() - t0)
    finally:
        env.close()


def part_sim(ctx: Context) -> list[Row]:
    backend, n = ("physx_cuda", ctx.num_envs) if ctx.cuda else ("physx_cpu", 1)
    steps = ctx.sim_steps if ctx.cuda else 10
    figures, rows = cpu_figures(), []
    for obs_mode in ("state", "rgb"):
        if obs_mode == "rgb" and vulkan_problem():
            rows.append(Row(f"{backend} x{n} rgb", f"skipped: {vulkan_problem()}", "skip"))
            continue
        sps = steps_per_s(obs_mode, backend, n, steps)
        ref = figures.get(obs_mode)
        ratio = f", {sps / ref:.1f}x the CPU path ({ref:g} steps/s, BENCHMARKS.md)" if ref else ""
        rows.append(Row(f"{backend} x{n} {obs_mode}", f"{sps:.0f} env steps/s{ratio}",
                        data={"env_steps_per_s": sps, "cpu_path_steps_per_s": ref}))
    return rows


# ----------------------------------------------------------------------------------------------------- grpo seeding


def part_grpo_seeding(ctx: Context) -> list[Row]:
    import torch

    from sim_trainer.envs.make import privileged_state
    from sim_trainer.envs.spec import EnvConfig
    from sim_trainer.envs.vec_env import make_vec_env

    seeds = [7, 7, 7, 7, 9, 9, 9, 9]
    cfg = EnvConfig(task="PushCube-v1", obs_mode="state", sim_backend="physx_cuda")
    venv = make_vec_env(cfg, len(seeds))
    try:
        venv.env.reset(seed=seeds)
        raw = privileged_state(venv.env)
        venv.reset(seeds)
        ours = privileged_state(venv.env)
    finally:
        venv.close()

    def spread(states: torch.Tensor) -> float:
        """The largest difference between an env and the first env of its seed group."""
        return max(float((states[i] - states[seeds.index(s)]).abs().max()) for i, s in enumerate(seeds))

    raw_spread, our_spread = spread(raw), spread(ours)
    apart = float((ours[0] - ours[4]).abs().max())
    ok = our_spread == 0.0 and apart > 0.0
    return [Row("raw ManiSkill reset(seed=[7,7,7,7,9,9,9,9])", f"max state difference within a group "
                f"{raw_spread:.3g}" + (" (the defect GpuVecEnv works around)" if raw_spread > 0 else ""), "info",
                {"within_group_max_abs": raw_spread}),
            Row("GpuVecEnv.reset (the project's fix)", f"within a group {our_spread:.3g}, between groups {apart:.3g}",
                "ok" if ok else "fail", {"within_group_max_abs": our_spread, "between_groups_max_abs": apart})]


# ----------------------------------------------------------------------------------------------------------- nccl


def nccl_worker() -> None:
    """Under torchrun: one NCCL all-reduce, its result checked."""
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl")
    x = torch.ones(1024, device="cuda")
    dist.all_reduce(x)
    torch.cuda.synchronize()
    assert float(x[0]) == dist.get_world_size(), float(x[0])
    dist.destroy_process_group()
    version = torch.cuda.nccl.version()
    print(f"nccl ok: world {x[0]:.0f}, NCCL {'.'.join(map(str, version)) if isinstance(version, tuple) else version}")


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--standalone", *args]


def part_nccl(ctx: Context) -> list[Row]:
    res = subprocess.run(torchrun(__file__, "--nccl-worker"), capture_output=True, text=True, timeout=80)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("nccl ok")), None)
    if res.returncode or line is None:
        return [Row("all_reduce under torchrun", f"failed (exit {res.returncode}): {tail(res.stderr)}", "fail")]
    return [Row("all_reduce under torchrun", line.removeprefix("nccl ok: "))]


def tail(text: str, n: int = 300) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "")[-n:]


# ------------------------------------------------------------------------------------------------------------- rl


class MemoryPeak(threading.Thread):
    """Polls nvidia-smi's memory.used (everything on the GPU: PhysX and rendering too, not only torch's)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_mib, self.stop = 0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            used = nvidia_smi("memory.used")
            if used.isdigit():
                self.peak_mib = max(self.peak_mib, int(used))


def rl_config(ctx: Context, out: Path) -> Path:
    """A shrunk copy of the GPU preset: ctx.rl_updates updates, no periodic evaluation, one save at the end."""
    from policy_runtime.yaml_io import dump_yaml, load_yaml_mapping

    cfg = load_yaml_mapping(RGB_GPU_PRESET)
    per_update = cfg["num_envs"] * cfg["rollout_chunks"] * 8  # x the checkpoint's 8 executed actions per chunk
    cfg.update(ckpt=str(ROOT / cfg["ckpt"]), total_env_steps=ctx.rl_updates * per_update, eval_every=0,
               eval_episodes=8, eval_envs=8, save_every=10**6)
    if not ctx.cuda:  # --rl-on-cpu: the same code path on a CPU host, tiny
        cfg.update(sim_backend="physx_cpu", num_envs=2, rollout_chunks=1, total_env_steps=ctx.rl_updates * 16,
                   minibatch=8, eval_episodes=1, eval_envs=1, critic_warmup=0)
    path = out / "rl_config.yaml"
    path.write_text(dump_yaml(cfg))
    return path


def part_rl(ctx: Context) -> list[Row]:
    out = Path(ctx.out)
    config = rl_config(ctx, out)
    run_dir = out / "rl_run"
    cmd = torchrun("-m", "sim_trainer.cli", "rl", "--config", str(config), "--out", str(run_dir), "--force")
    memory = MemoryPeak()
    memory.start()
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUTS["rl"] - 20, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    memory.stop.set()
    (out / "rl_log.txt").write_text(res.stdout + res.stderr)
    if res.returncode:
        return [Row("torchrun sim-trainer rl", f"failed (exit {res.returncode}; log rl_log.txt): {tail(res.stderr)}",
                    "fail")]
    updates = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    updates = [u for u in updates if "rollout_s" in u]
    last = updates[-1]  # the first update also pays for warm-up (kernels, allocator)
    steps = last["env_steps"] - (updates[-2]["env_steps"] if len(updates) > 1 else 0)
    roll, whole = last["env_steps_per_s"], steps / last["update_s"]
    raw = ctx.raw_rgb_steps_per_s
    frac = (lambda v: f" ({v / raw:.2f} of raw {raw:.0f})") if raw else (lambda v: "")
    data = {"rollout_env_steps_per_s": roll, "update_env_steps_per_s": whole, "raw_env_steps_per_s": raw,
            "updates": len(updates), "wall_s": wall, "peak_gpu_memory_mib": memory.peak_mib,
            "approx_kl": last.get("approx_kl")}
    rows = [Row("rollout phase (last update)", f"{roll:.0f} env steps/s{frac(roll)}", data=data),
            Row("whole update (rollout + learning)", f"{whole:.0f} env steps/s{frac(whole)}"),
            Row("run", f"{len(updates)} updates of {steps} env steps, {wall:.0f} s wall clock incl. start-up", "info")]
    if ctx.cuda:
        rows.append(Row("peak GPU memory (nvidia-smi)", f"{memory.peak_mib / 1024:.1f} GiB", "info"))
    return rows


# ------------------------------------------------------------------------------------------------------ inference


def random_model(tmp: Path, size: str) -> Path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from inference_latency import random_checkpoint

    return random_checkpoint(tmp / size, size)


def part_inference(ctx: Context) -> list[Row]:

    from policy_runtime.backends.torch_backend import TorchBackend, TorchOptions
    from policy_runtime.contract import zero_feeds

    device = "cuda" if ctx.cuda else "cpu"
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        ckpt = random_model(Path(tmp), ctx.model_size)
        backends = {k: TorchBackend(ckpt, TorchOptions(device=device, num_steps=k, warmup_runs=1)) for k in (10, 4)}
        feeds = zero_feeds(backends[10].contract(), 1)
        params = sum(p.numel() for p in backends[10].model.parameters()) / 1e6
        rows.append(Row("model", f"`{ctx.model_size}` FlowVLA, random weights, {params:.1f} M parameters, batch 1, "
                        f"{device}", "info"))
        base = measure(ctx, lambda: backends[10].run(feeds))
        rows.append(ms_row("torch eager K=10", base))
        rows.append(ms_row("torch eager K=4", measure(ctx, lambda: backends[4].run(feeds)), base))
        if ctx.cuda:
            graphs = TorchBackend(ckpt, TorchOptions(device=device, num_steps=4, cuda_graph=True))
            rows.append(ms_row("torch CUDA graphs K=4", measure(ctx, lambda: graphs.run(feeds)), base))
        else:
            rows.append(Row("torch CUDA graphs K=4", "skipped: no CUDA device", "skip"))
        rows.append(ort_cuda_row(ckpt, Path(tmp), ctx, base))
    return rows


def ort_cuda_row(ckpt: Path, tmp: Path, ctx: Context, base: dict) -> Row:
    import onnxruntime as ort

    from policy_runtime.backends.onnx_backend import CUDA, OnnxBackend, OnnxOptions, onnxruntime_distributions

    item = "ONNX Runtime CUDA provider K=4 (IOBinding)"
    if CUDA not in ort.get_available_providers():
        return Row(item, f"not installed: {' + '.join(onnxruntime_distributions()) or 'onnxruntime'} "
                   f"{ort.__version__} offers {', '.join(ort.get_available_providers())} "
                   "(scripts/install_gpu_runtime.sh installs onnxruntime-gpu)", "skip")
    if not ctx.cuda:
        return Row(item, "skipped: no CUDA device", "skip")
    from policy_runtime.contract import zero_feeds
    from sim_trainer.export.onnx_export import export_onnx

    res = export_onnx(ckpt, tmp / "export_k4", 4)
    backend = OnnxBackend(res.out, OnnxOptions(providers=(CUDA,), require_gpu=True, iobinding=True))
    try:
        feeds = zero_feeds(backend.contract(), 1)
        item += f" on {backend.provider}, IOBinding {backend.use_iobinding}"
        return ms_row(item, measure(ctx, lambda: backend.run(feeds)), base)
    finally:
        backend.close()


# ------------------------------------------------------------------------------------------------------------ vla


def part_vla(ctx: Context) -> list[Row]:
    import torch
    from safetensors.torch import load_file

    from sim_trainer.models.vla import load_vla

    device = torch.device("cuda" if ctx.cuda else "cpu")
    rows = []
    for kind in ("pi0", "pi05"):
        fixture = ROOT / "tests" / "fixtures" / kind
        if not fixture.is_dir():
            rows.append(Row(f"{kind} tiny", f"skipped: no fixture at {fixture}", "skip"))
            continue
        torch.manual_seed(0)
        model = load_vla(fixture).to(device).eval()
        ref = load_file(str(fixture / "reference.safetensors"))
        images = {k.removeprefix("image."): v[:1].to(device) for k, v in ref.items() if k.startswith("image.")}
        state, tokens, noise = (ref[k][:1].to(device) for k in ("state", "tokens", "noise"))

        def sample(k: int, m=model, i=images, s=state, t=tokens, n=noise) -> None:
            with torch.inference_mode():
                m.sample_actions(i, s, t, n, k)

        params = sum(p.numel() for p in model.parameters()) / 1e6
        base = measure(ctx, lambda: sample(10))
        rows.append(ms_row(f"{kind} tiny ({params:.1f} M) eager K=10", base))
        rows.append(ms_row(f"{kind} tiny eager K=4", measure(ctx, lambda: sample(4)), base))
    return rows


# ------------------------------------------------------------------------------------------------------- the driver


def run_part(name: str, ctx: Context, timeout: float) -> list[Row]:
    """The part in a child process; its rows, or one "fail" row for a crash or a timeout."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = Path(f.name)
    cmd = [sys.executable, __file__, "--child", name, "--ctx", json.dumps(asdict(ctx)), "--result", str(result)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
        Path(ctx.out, f"{name}.log").write_text(res.stdout + res.stderr)
        if res.returncode == 0 and result.stat().st_size:
            return [Row(**r) for r in json.loads(result.read_text())]
        return [Row("-", f"crashed (exit {res.returncode}; log {name}.log): {tail(res.stderr)}", "fail")]
    except subprocess.TimeoutExpired:
        return [Row("-", f"timed out after {timeout:.0f} s", "fail")]
    finally:
        result.unlink(missing_ok=True)


def precondition(name: str, ctx: Context) -> list[Row] | None:
    """The one row saying why a part cannot run here, or None."""
    if name in NEEDS_CUDA and not ctx.cuda and not (name == "rl" and ctx.rl_on_cpu):
        return skip(f"no CUDA device ({NEEDS_CUDA[name]})")
    if name in ("sim", "grpo_seeding", "rl"):
        try:
            import mani_skill  # noqa: F401
        except ImportError as e:
            return skip(f"ManiSkill not importable ({e}): install the wheelhouse (make gpu-check WHEELHOUSE=DIR)")
        if ctx.cuda and physx_gpu_problem():
            return [Row("-", str(physx_gpu_problem()), "fail")]
    if name == "rl" and vulkan_problem():
        return skip(f"{vulkan_problem()} (the preset is RGB)")
    return None


def child(name: str, ctx: Context, result: Path) -> None:
    rows = precondition(name, ctx)
    if rows is None:
        try:
            rows = globals()[f"part_{name}"](ctx)
        except Exception as e:  # a part's failure is a row; the others go on
            rows = [Row("-", f"failed: {type(e).__name__}: {e}", "fail")]
    result.write_text(json.dumps([asdict(r) for r in rows]))


def markdown(results: dict[str, list[Row]], header: dict) -> str:
    lines = [f"GPU check ({header['date']}, {header['host']}): {header['verdict']}", "",
             "| part | item | result | status |", "|---|---|---|---|"]
    for part, rows in results.items():
        for r in rows:
            value = r.value.replace("|", "\\|")
            lines.append(f"| {part} | {r.item} | {value} | {r.status} |")
    return "\n".join(lines) + "\n"


def cuda_available() -> bool:
    res = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                         capture_output=True, text=True, timeout=120)
    return res.stdout.strip() == "True"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/gpu_check", help="directory for gpu_check.md/.json and the logs")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="the parts to run (default: all)")
    p.add_argument("--num-envs", type=int, default=256, help="physx_cuda envs for the sim part (default 256)")
    p.add_argument("--sim-steps", type=int, default=100, help="timed env steps per sim row (default 100)")
    p.add_argument("--rl-updates", type=int, default=2, help="PPO updates in the RL part (default 2)")
    p.add_argument("--calls", type=int, default=None, help="timed calls per latency row (default 100; 3 on CPU)")
    p.add_argument("--model-size", choices=("tiny", "small", "base"), default=None,
                   help="FlowVLA size for the inference part (default base; tiny on a host without CUDA)")
    p.add_argument("--expect-gpu", action="store_true", help="a missing CUDA device is a failure, not a skip")
    p.add_argument("--rl-on-cpu", action="store_true", help="run the RL part without CUDA too (physx_cpu, tiny)")
    p.add_argument("--child", choices=PARTS, help=argparse.SUPPRESS)
    p.add_argument("--ctx", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--nccl-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.nccl_worker:
        nccl_worker()
        return 0
    if args.child:
        child(args.child, Context(**json.loads(args.ctx)), Path(args.result))
        return 0
    if min(args.num_envs, args.sim_steps, args.rl_updates, args.calls or 1) < 1:
        print("error: --num-envs, --sim-steps, --rl-updates and --calls must be >= 1", file=sys.stderr)
        return 2

    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: cannot use --out {out}: {e.strerror}", file=sys.stderr)
        return 2
    if args.expect_gpu:
        os.environ["GPU_CHECK_EXPECT_GPU"] = "1"
    cuda = cuda_available()
    ctx = Context(str(out.resolve()), cuda, args.num_envs, args.sim_steps, args.rl_updates,
                  args.calls or (100 if cuda else 3), args.rl_on_cpu, args.model_size or ("base" if cuda else "tiny"))
    results: dict[str, list[Row]] = {}
    t_start = time.perf_counter()
    for name in [n for n in PARTS if n in args.parts]:
        t0 = time.perf_counter()
        rows = run_part(name, ctx, TIMEOUTS[name])
        results[name] = rows
        for r in rows:
            print(f"gpu-check: {name}: {'' if r.item == '-' else r.item + ': '}{r.value} [{r.status}]", flush=True)
        print(f"gpu-check: {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        if name == "sim":
            rgb = [r for r in rows if r.item.endswith(" rgb") and "env_steps_per_s" in r.data]
            ctx.raw_rgb_steps_per_s = rgb[0].data["env_steps_per_s"] if rgb else None
    failed = [f"{part}: {r.item}" for part, rows in results.items() for r in rows if r.status == "fail"]
    header = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": os.uname().nodename,
              "cuda": cuda, "wall_s": round(time.perf_counter() - t_start, 1),
              "verdict": f"{len(failed)} failure(s)" if failed else "nothing expected failed"}
    table = markdown(results, header)
    print("\n" + table)
    (out / "gpu_check.md").write_text(table)
    (out / "gpu_check.json").write_text(json.dumps(
        {**header, "failed": failed, "parts": {k: [asdict(r) for r in v] for k, v in results.items()}}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
