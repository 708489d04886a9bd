"""Write what people look at after an evaluation: JSON, a Markdown report, an episode GIF."""

from __future__ import annotations

import io
import json
from pathlib import Path

import imageio.v2 as imageio
import numpy as np

from policy_runtime.artifacts import atomic_write_bytes, atomic_write_text
from sim_trainer.evaluate.rollout import EvalResult


def write_video(frames: list[np.ndarray], path: Path, fps: float, scale: int = 4) -> Path | None:
    """The episode as a GIF, written whole or not at all; no frames (state observations): no GIF, and none kept."""
    if not frames:
        path.unlink(missing_ok=True)  # a GIF of an earlier run (replaced with --force) would pass for this one's
        return None
    big = [np.repeat(np.repeat(f, scale, 0), scale, 1) for f in frames]
    buf = io.BytesIO()
    imageio.mimsave(buf, big, format="GIF", duration=1000.0 / fps, loop=0)
    atomic_write_bytes(path, buf.getvalue())
    return path


def format_table(summary: dict) -> str:
    lo, hi = summary["success_once_wilson95"]
    elo, ehi = summary["success_at_end_wilson95"]
    rows = [
        ("task", summary["task"]),
        ("episodes", summary["episodes"]),
        ("success (once)", f"{summary['success_once']:.1%}  [95% CI {lo:.1%} - {hi:.1%}]"),
        ("success (at end)", f"{summary['success_at_end']:.1%}  [95% CI {elo:.1%} - {ehi:.1%}]"),
        ("mean episode length", f"{summary['mean_length']:.1f} / {summary['horizon']} steps"),
        ("env steps/s", f"{summary['env_steps_per_s']:.1f}"),
        ("policy ms per chunk", f"{summary['policy_ms_per_chunk']:.1f}"),
    ]
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"| {k.ljust(w)} | {v} |" for k, v in rows)


def write_report(result: EvalResult, out_dir: str | Path, checkpoint: str, control_hz: float) -> dict:
    """Write eval.json, report.md and episode.gif into `out_dir` (claimed by the caller), each file atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = result.to_dict()
    data["checkpoint"] = checkpoint
    atomic_write_text(out / "eval.json", json.dumps(data, indent=2))
    video = write_video(result.frames, out / "episode.gif", control_hz)
    summary = data["summary"]
    md = [f"# Evaluation of `{checkpoint}` on {summary['task']}", "", "| metric | value |", "|---|---|",
          format_table(summary), "",
          f"Seeds {summary['seeds'][0]}..{summary['seeds'][-1]} (held out from the demonstration seeds).", ""]
    if video:
        md += [f"![first episode]({video.name})", ""]
    atomic_write_text(out / "report.md", "\n".join(md))
    return {"json": str(out / "eval.json"), "report": str(out / "report.md"), "video": str(video) if video else None}
