"""`sim-trainer`: demonstrations, SFT, evaluation and the no-hardware demo.

Every user mistake (unknown task, missing or corrupt file, mismatched checkpoint) ends in one line on
stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from policy_runtime.errors import OneLineParser, run_command
from policy_runtime.yaml_io import load_yaml_mapping
from sim_trainer.errors import UserError

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "pushcube_rgb_small"


def _camera_overrides(path: str | None) -> dict:
    from sim_trainer.envs.spec import camera_overrides

    return camera_overrides(load_yaml_mapping(path, "camera config"), path) if path else {}


def cmd_demos(a: argparse.Namespace) -> int:
    from sim_trainer.data.demos import generate_demos
    from sim_trainer.envs.spec import EnvConfig

    cfg = EnvConfig(task=a.task, obs_mode=a.obs_mode, control_mode=a.control_mode, image_size=a.image_size,
                    cameras=_camera_overrides(a.camera_config), domain=a.domain).validate()
    counts = generate_demos(cfg, a.num, a.out, seed_start=a.seed_start, workers=a.workers, force=a.force)
    print(f"wrote {counts['kept']} demos to {a.out} ({counts['plan_failed']} failed plans, "
          f"{counts['conversion_failed']} failed conversions, {counts['attempts']} seeds tried)")
    return 0


def cmd_export_lerobot(a: argparse.Namespace) -> int:
    from sim_trainer.data.lerobot import export_lerobot

    r = export_lerobot(a.data, a.out, force=a.force)
    n = r["skipped_empty"]
    skipped = f", {n} episode{'s' * (n != 1)} without steps skipped" if n else ""
    print(f"wrote LeRobotDataset v3.0 to {a.out}: {r['episodes']} episodes, {r['frames']} frames at {r['fps']} fps, "
          f"cameras {', '.join(r['cameras']) or 'none'}{skipped}")
    return 0


def cmd_import_lerobot(a: argparse.Namespace) -> int:
    from sim_trainer.data.lerobot import import_lerobot

    r = import_lerobot(a.dir, a.out, force=a.force, source=a.source)
    print(f"wrote {r['episodes']} episodes ({r['frames']} steps) to {a.out}")
    return 0


def _check_push(a: argparse.Namespace) -> None:
    if a.push_to_hub is not None:
        from policy_runtime.hub import check_push_target

        check_push_target(a.push_to_hub)


def _push(a: argparse.Namespace, out: Path, what: str) -> None:
    """--push-to-hub, under the output's lock (no run may write it meanwhile); the directory is only read."""
    if a.push_to_hub is not None:
        from policy_runtime.artifacts import OutputLock
        from policy_runtime.hub import push_dir

        with OutputLock(out):
            url = push_dir(out, a.push_to_hub, what)
        print(f"pushed {out} to {url}")


def cmd_sft(a: argparse.Namespace) -> int:
    from sim_trainer.config_check import check_threads
    from sim_trainer.config_flags import config_from_args
    from sim_trainer.sft.trainer import SFTConfig, train_sft
    from sim_trainer.tracking import wandb_settings

    cfg = config_from_args(SFTConfig, a)
    wandb = wandb_settings(a)
    _check_push(a)
    _set_threads(check_threads(a.threads))
    out = train_sft(cfg, force=a.force, wandb=wandb)
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun (--fsdp): rank 0 reports and pushes
        return 0
    print(f"checkpoint written to {out}")
    _push(a, out, "checkpoint")
    return 0


def cmd_rl(a: argparse.Namespace) -> int:
    from sim_trainer.config_check import check_threads
    from sim_trainer.config_flags import config_from_args
    from sim_trainer.rl.config import RLConfig
    from sim_trainer.rl.trainer import train_rl
    from sim_trainer.tracking import wandb_settings

    cfg = config_from_args(RLConfig, a)
    wandb = wandb_settings(a)
    _check_push(a)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    _set_threads(check_threads(a.threads) or max(1, (os.cpu_count() or 1) // world_size))
    out = train_rl(cfg, force=a.force, wandb=wandb)
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 reports and pushes
        return 0
    if cfg.algorithm == "sac_flow":  # from-scratch SAC Flow state, not a model checkpoint that eval/export read
        print(f"SAC Flow run written to {out} (trainer state, replay, metrics.jsonl, tb/)")
        _push(a, out, "SAC Flow run")
    else:
        print(f"RL checkpoint written to {out}")
        _push(a, out, "RL checkpoint")
    return 0


def _set_threads(n: int | None) -> None:
    import torch

    torch.set_num_threads(n or os.cpu_count() or 1)


# Bounds of the evaluation options: one typo must not occupy a shared machine for hours or exhaust it.
MAX_DENOISING_STEPS = 64  # K: each step is a full pass of the action expert
MAX_EPISODES = 100_000
MAX_ENVS = {"physx_cpu": 64, "physx_cuda": 4096}  # physx_cpu runs one process per env
MAX_EPISODE_STEPS = 10_000
MAX_SEED = 2**31 - 1


def _check_range(value: int | None, flag: str, low: int, high: int, why: str = "") -> None:
    """A flag left off (None) takes its default; a given value must lie in [low, high] (0 is not "default")."""
    if value is not None and not low <= value <= high:
        raise UserError(f"{flag} must be between {low} and {high}{why}, got {value}")


def _check_eval_args(a: argparse.Namespace) -> None:
    """Every number and device of `eval`/`demo`, checked before anything is loaded."""
    _check_range(a.episodes, "--episodes", 1, MAX_EPISODES)
    _check_range(a.envs, "--envs", 1, MAX_ENVS[a.sim_backend], f" with --sim-backend {a.sim_backend}")
    _check_range(a.steps, "--steps", 1, MAX_DENOISING_STEPS, " (denoising steps K)")
    _check_range(a.max_steps, "--max-steps", 1, MAX_EPISODE_STEPS)
    _check_range(a.seed_start, "--seed-start", 0, MAX_SEED - a.episodes - a.envs,
                 f" (seeds run from it to it + --episodes; the largest seed is {MAX_SEED})")
    _check_range(a.threads, "--threads", 1, os.cpu_count() or 1, " (this host's CPU cores)")
    if (a.ckpt is None) == (a.export is None):
        raise UserError("give exactly one of --ckpt (PyTorch) and --export (ONNX Runtime)")
    if a.export is not None and a.precision != "fp32":
        raise UserError("--precision applies to a --ckpt (PyTorch); an --export runs in ONNX Runtime's fp32")
    if a.export is not None and a.steps is not None:
        raise UserError("--steps is fixed in an export (K is unrolled); export again with another --steps")
    if a.export is not None and a.device != "cpu":
        raise UserError("--device applies to --ckpt; an --export runs on ONNX Runtime's CPU provider")
    _check_device(a.device, a.sim_backend)


def _check_device(device: str, sim_backend: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device!r} is not a torch device (cpu, cuda or cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: only cpu and cuda devices are supported")
    if (dev.type == "cuda" or sim_backend == "physx_cuda") and not torch.cuda.is_available():
        what, fix = ((f"--device {device}", "--device cpu") if dev.type == "cuda"
                     else (f"--sim-backend {sim_backend}", "--sim-backend physx_cpu"))
        raise UserError(f"{what} needs CUDA, which this host does not have; use {fix}")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this host has {torch.cuda.device_count()} CUDA device(s)")


def _check_export_dir(path: Path) -> None:
    """Name what --export points at when it is not an export (a file, a checkpoint), not just "missing"."""
    from sim_trainer.models.checkpoint import describe_kind

    if not os.path.isdir(path):
        kind = describe_kind(path)
        raise UserError(f"export {path} does not exist" if kind == "missing"
                        else f"export {path} is {kind}, not an export directory")
    if (path / "config.json").is_file() and not (path / "manifest.json").exists():
        raise UserError(f"{path} is a checkpoint, not an export: evaluate it with --ckpt, or export it first")


def _new_run_dir(base: str) -> Path:
    """A fresh run_YYYYmmdd_HHMMSS directory under `base`: each demo keeps its own results, none is replaced."""
    from policy_runtime.artifacts import check_writable_dir

    root = check_writable_dir(base)
    stamp = time.strftime("%Y%m%d_%H%M%S")
    for i in range(100):
        run = root / (f"run_{stamp}" if i == 0 else f"run_{stamp}_{i}")
        try:
            run.mkdir()
            return run
        except FileExistsError:
            continue
        except OSError as e:
            raise UserError(f"cannot create run directory {run}: {e.strerror}") from None
    raise UserError(f"cannot create a new run directory in {root}: too many runs this second")


def cmd_eval(a: argparse.Namespace) -> int:
    from policy_runtime.artifacts import OutputLock, claim_output_dir
    from policy_runtime.hub import local_dir
    from sim_trainer.envs.spec import EnvConfig
    from sim_trainer.evaluate.report import format_table, write_report
    from sim_trainer.evaluate.rollout import evaluate
    from sim_trainer.models.checkpoint import load_checkpoint
    from sim_trainer.policy import BackendPolicy, ChunkPolicy

    _check_eval_args(a)
    _set_threads(a.threads)
    ckpt, export = (None if p is None else local_dir(p) for p in (a.ckpt, a.export))  # hf:// is downloaded
    if ckpt is not None:
        loaded = load_checkpoint(ckpt)
        policy = ChunkPolicy(loaded.model, loaded.spec, num_steps=a.steps, device=a.device, precision=a.precision)
    else:
        _check_export_dir(export)
        policy = BackendPolicy.from_export(export, threads=a.threads or 0)
    spec = policy.spec
    task = a.task or spec.task
    env_cfg = EnvConfig.for_policy(spec, task, sim_backend=a.sim_backend, max_episode_steps=a.max_steps,
                                   cameras=_camera_overrides(a.camera_config), domain=a.domain)
    # The output is checked and claimed before the (long) evaluation, so its results cannot be lost at the end.
    out = _new_run_dir(a.out) if a.new_run_dir else claim_output_dir(a.out, force=a.force,
                                                                     inputs=(ckpt, export))
    with OutputLock(out):
        result = evaluate(policy, env_cfg, a.episodes, a.envs, seed_start=a.seed_start)
        paths = write_report(result, out, str(a.ckpt or a.export), spec.control_hz)
    print(format_table(result.summary()))
    print(f"report: {paths['report']}  json: {paths['json']}  video: {paths['video']}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from policy_runtime.hub import local_dir
    from sim_trainer.export.onnx_export import export_onnx

    _check_push(a)
    result = export_onnx(local_dir(a.ckpt), a.out, a.steps, force=a.force)
    m = result.manifest
    print(f"exported {a.ckpt} with K={m['num_steps']} to {result.out / m['model_file']} "
          f"(opset {m['onnx']['opset']}, IR {m['onnx']['ir_version']}, parity max |err| "
          f"{m['parity']['max_abs_err']:.1e} <= {m['parity']['tolerance']:.0e})")
    _push(a, result.out, "export")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    """The no-GPU, no-robot demo: evaluate the shipped checkpoint in ManiSkill and write a report.

    Each run writes a new OUT/run_<time> directory, so `make demo-sim` can run again without --force.
    """
    args = argparse.Namespace(ckpt=a.ckpt, export=None, task=None, episodes=a.episodes, envs=a.envs, out=a.out,
                              steps=None, seed_start=a.seed_start, sim_backend="physx_cpu", max_steps=None,
                              camera_config=None, domain=None, threads=None, device="cpu", precision="fp32",
                              force=False, new_run_dir=True)
    _check_eval_args(args)
    print(f"Evaluating the shipped checkpoint {a.ckpt} on {a.episodes} held-out ManiSkill episodes (CPU)...")
    return cmd_eval(args)


def cmd_import_rosbag(a: argparse.Namespace) -> int:
    from sim_trainer.data.rosbag_import import import_rosbags

    r = import_rosbags(a.bags, a.out, a.topic_map, force=a.force)
    for why in r["skipped"]:
        print(f"skipped {why}")
    print(f"imported {r['episodes']} episode(s), {r['steps']} steps, into {a.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from sim_trainer.config_flags import add_config_flags
    from sim_trainer.envs.tasks import CONTROL_MODES, OBS_MODES, TASKS
    from sim_trainer.evaluate.rollout import EVAL_SEED_START
    from sim_trainer.rl.config import RLConfig
    from sim_trainer.sft.trainer import SFTConfig
    from sim_trainer.tracking import add_push_flag, add_tracking_flags

    p = OneLineParser(prog="sim-trainer", description=(
        "Train and evaluate flow-matching VLA policies in ManiSkill3. Typical flow: `demos` (motion-planned "
        "demonstrations) -> `sft` (flow-matching fine-tuning) -> `eval` (closed-loop success with intervals)."))
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demos", help="generate motion-planning demonstrations in the episode format",
                       description="Solve seeds with ManiSkill's Panda motion planner, convert each solution to the "
                                   "policy's control mode and observations, keep the successful ones.")
    d.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)}")
    d.add_argument("-n", "--num", type=int, default=100, help="number of successful demos to write")
    d.add_argument("--out", required=True, help="new dataset directory (an existing one is never changed)")
    d.add_argument("--force", action="store_true", help="replace the episode dataset already in --out")
    d.add_argument("--obs-mode", default="rgb", choices=OBS_MODES)
    d.add_argument("--control-mode", default="pd_joint_delta_pos", choices=CONTROL_MODES)
    d.add_argument("--image-size", type=int, default=64, help="policy image resolution (square)")
    d.add_argument("--camera-config", help="YAML of camera overrides (pose, intrinsic, size), e.g. from calibrate")
    d.add_argument("--domain", help="shifted domain: 'real_proxy' (built-in) or a domain YAML; the episodes are "
                                    "labelled real-proxy (see docs/domains.md)")
    d.add_argument("--seed-start", type=int, default=0, help="first env seed; seeds are tried in order")
    d.add_argument("--workers", type=int, default=1, help="parallel planner processes")
    d.set_defaults(func=cmd_demos)

    ds = sub.add_parser("dataset", help="convert episode datasets to and from other formats",
                        description="Convert between the project's episode datasets and LeRobotDataset v3.0 "
                                    "(docs/datasets.md), and turn rosbag2 recordings into episodes (docs/ros2.md).")
    dsub = ds.add_subparsers(dest="dataset_command", required=True)
    de = dsub.add_parser("export-lerobot", help="write an episode dataset as a LeRobotDataset v3.0",
                         description="Write DATA as a LeRobotDataset v3.0 (parquet, camera frames as lossless PNG "
                                     "image features) that LeRobotDataset(repo_id, root=OUT) loads.")
    de.add_argument("data", metavar="DATA", help="episode dataset directory")
    de.add_argument("--out", required=True, help="new LeRobot dataset directory (a non-empty one needs --force)")
    de.add_argument("--force", action="store_true", help="replace the LeRobot dataset already in --out")
    de.set_defaults(func=cmd_export_lerobot)
    di = dsub.add_parser("import-lerobot", help="write a LeRobotDataset v3.0 as an episode dataset",
                         description="Read the LeRobotDataset v3.0 in DIR (image features; video is not read) and "
                                     "write it as an episode dataset. sft --data lerobot:DIR reads one in place.")
    di.add_argument("dir", metavar="DIR", help="LeRobot dataset directory (the one with meta/info.json)")
    di.add_argument("--out", required=True, help="new episode dataset directory")
    di.add_argument("--force", action="store_true", help="replace the episode dataset already in --out")
    di.add_argument("--source", default="real", choices=("sim", "real-proxy", "real"),
                    help="source label of episodes recorded with LeRobot (ours carry their own)")
    di.set_defaults(func=cmd_import_lerobot)
    rb = dsub.add_parser("import-rosbag", help="rosbag2 recordings (the eval manager's trials, or any bag with a "
                                               "topic map) -> an episode dataset",
                         description="Each bag (a rosbag2 directory, MCAP or SQLite) becomes one episode. The eval "
                                     "manager's trial bags need no map; another recording needs --topic-map naming "
                                     "its image, state and action topics (docs/ros2.md).")
    rb.add_argument("bags", nargs="+", metavar="BAG", help="rosbag2 directories")
    rb.add_argument("--out", required=True, help="new dataset directory (an existing one is never changed)")
    rb.add_argument("--topic-map", help="YAML naming the image, state and action topics of a bag not recorded by "
                                        "the eval manager")
    rb.add_argument("--force", action="store_true", help="replace the episode dataset already in --out")
    rb.set_defaults(func=cmd_import_rosbag)

    s = sub.add_parser("sft", help="flow-matching supervised fine-tuning",
                       description="Train the flow VLA on one or more episode datasets. Options come from a YAML "
                                   "preset (--config); flags override it. The output directory is a checkpoint.")
    add_config_flags(s, SFTConfig, "configs/sft_pushcube_rgb_small.yaml")
    add_tracking_flags(s, "checkpoint directory")
    s.set_defaults(func=cmd_sft)

    r = sub.add_parser("rl", help="RL: PPO or GRPO fine-tuning (Flow-Noise, Flow-SDE or ReinFlow noise), or SAC Flow",
                       description="Fine-tune an SFT checkpoint with on-policy RL in ManiSkill, or train a flow "
                                   "policy from scratch with off-policy SAC Flow (--algorithm sac_flow). The chunk "
                                   "is the outer MDP step, the K denoising steps the inner one. Options come from a "
                                   "YAML preset (--config); flags override it. "
                                   "Multi-process: torchrun --nproc-per-node N -m sim_trainer.cli rl ...")
    add_config_flags(r, RLConfig, "configs/rl_pushcube_state_cpu.yaml")
    add_tracking_flags(r, "run directory")
    r.set_defaults(func=cmd_rl)

    e = sub.add_parser("eval", help="closed-loop evaluation with a Wilson interval, JSON report and video")
    e.add_argument("--ckpt", help="checkpoint directory (PyTorch), or hf://owner/repo[@revision][/subdir]")
    e.add_argument("--export", help="export directory (ONNX Runtime, CPU), instead of --ckpt; or an hf:// path")
    e.add_argument("--task", help="task to evaluate on (default: the checkpoint's task)")
    e.add_argument("--episodes", type=int, default=100)
    e.add_argument("--envs", type=int, default=2, help="parallel envs (CPU: one process each)")
    e.add_argument("--out", default="outputs/eval", help="report directory; a non-empty one needs --force")
    e.add_argument("--force", action="store_true", help="replace the report files in a non-empty --out")
    e.add_argument("--steps", type=int, help="denoising steps K (default: the checkpoint's)")
    e.add_argument("--seed-start", type=int, default=EVAL_SEED_START, help="first episode seed (held out)")
    e.add_argument("--max-steps", type=int, help="episode horizon (default: the task's)")
    e.add_argument("--sim-backend", default="physx_cpu", choices=("physx_cpu", "physx_cuda"))
    e.add_argument("--camera-config", help="YAML of camera overrides (from calibrate sim-camera)")
    e.add_argument("--domain", help="evaluate in a shifted domain: 'real_proxy' (built-in) or a domain YAML "
                                    "(see docs/domains.md)")
    e.add_argument("--device", default="cpu", help="torch device for the policy")
    e.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="--ckpt: bf16 runs the policy under bf16 autocast on --device (weights stay as loaded)")
    e.add_argument("--threads", type=int, help="torch CPU threads, at most this host's cores (default: all)")
    e.set_defaults(func=cmd_eval, new_run_dir=False)

    x = sub.add_parser("export", help="export the K-step denoiser to ONNX with a manifest",
                       description="Write policy.onnx (prefix encoding + K unrolled Euler steps, noise as an input, "
                                   "normalisation inside, dynamic batch) and manifest.json (the serving contract, "
                                   "with the ONNX-vs-PyTorch parity measured now; above 1e-4 the export fails).")
    x.add_argument("--ckpt", required=True, help="checkpoint directory, or hf://owner/repo[@revision][/subdir]")
    x.add_argument("--steps", type=int, default=4, help="denoising steps K to unroll, 1-64 (1-4 are the fast ones)")
    x.add_argument("--out", required=True, help="export directory (not the checkpoint's); a non-empty one needs "
                                                "--force")
    x.add_argument("--force", action="store_true", help="replace the export in a non-empty --out (built aside "
                                                        "first: a failed export leaves the old one intact)")
    add_push_flag(x, "export directory")
    x.set_defaults(func=cmd_export)

    m = sub.add_parser("demo", help="evaluate the shipped checkpoint and write a report (what `make demo` runs)")
    m.add_argument("--ckpt", default=str(DEFAULT_CHECKPOINT))
    m.add_argument("--episodes", type=int, default=20)
    m.add_argument("--envs", type=int, default=2)
    m.add_argument("--seed-start", type=int, default=EVAL_SEED_START)
    m.add_argument("--out", default="outputs/demo", help="each run writes a new OUT/run_<date>_<time> directory")
    m.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("sim-trainer", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
