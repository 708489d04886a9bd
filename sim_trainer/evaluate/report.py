"""Write what people look at after an evaluation: JSON, a Markdown report, an episode GIF."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v2 as imageio
import numpy as np

from sim_trainer.evaluate.rollout import EvalResult


def write_video(frames: list[np.ndarray], path: Path, fps: float, scale: int = 4) -> Path | None:
    if not frames:
        return None
    big = [np.repeat(np.repeat(f, scale, 0), scale, 1) for f in frames]
    imageio.mimsave(path, big, duration=1000.0 / fps, loop=0)
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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = result.to_dict()
    data["checkpoint"] = checkpoint
    (out / "eval.json").write_text(json.dumps(data, indent=2))
    video = write_video(result.frames, out / "episode.gif", control_hz)
    summary = data["summary"]
    md = [f"# Evaluation of `{checkpoint}` on {summary['task']}", "", "| metric | value |", "|---|---|",
          format_table(summary), "",
          f"Seeds {summary['seeds'][0]}..{summary['seeds'][-1]} (held out from the demonstration seeds).", ""]
    if video:
        md += [f"![first episode]({video.name})", ""]
    (out / "report.md").write_text("\n".join(md))
    return {"json": str(out / "eval.json"), "report": str(out / "report.md"), "video": str(video) if video else None}
