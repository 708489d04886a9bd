"""Trial plan, append-only results journal and summary of an evaluation session; no ROS.

The journal is JSON Lines, one fsync'ed line per event, never rewritten. A crash (even kill -9) loses at
most the running trial: on restart a `start` without its `end` gets an `end` with outcome `aborted`; a
line torn by the crash is closed off by the next append and skipped when reading. The summary is derived
from the journal alone, so it can always be rebuilt. A plan entry is done once it has a success or failure
that no later `redo` discarded; aborted trials do not count and their plan entry is run again, up to a
bound: an entry aborted `max_aborts` times is given up (a server that rejects every request must not keep
the session going forever), and the summary lists it with the last abort's reason.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from policy_runtime.errors import UserError
from policy_runtime.stats import wilson_interval
from policy_runtime.yaml_io import load_yaml_mapping

OUTCOMES = ("success", "failure", "aborted")


class PlanError(UserError):
    """A trial plan that cannot be run; the message says what is wrong."""


@dataclass(frozen=True)
class PlannedTrial:
    index: int
    seed: int
    instruction: str


def load_plan(path: str | Path, default_instruction: str = "") -> list[PlannedTrial]:
    """Trial plan YAML: `trials: [{seed, instruction?}, ...]` or `count: N` + `seed_start` (+ `instruction`)."""
    data = load_yaml_mapping(path, "trial plan", error=PlanError)
    instruction = str(data.get("instruction", default_instruction) or "")
    if "trials" in data:
        items = data["trials"]
        if not isinstance(items, list) or not items:
            raise PlanError(f"trial plan {path}: `trials` must be a non-empty list")
        out = []
        for i, t in enumerate(items):
            if not isinstance(t, dict) or not isinstance(t.get("seed"), int):
                raise PlanError(f"trial plan {path}: trial {i} needs an integer `seed`")
            out.append(PlannedTrial(i, int(t["seed"]), str(t.get("instruction", instruction))))
        return out
    count, start = data.get("count"), data.get("seed_start", 100_000)
    if not isinstance(count, int) or count < 1 or not isinstance(start, int):
        raise PlanError(f"trial plan {path}: `count` must be a positive integer and `seed_start` an integer")
    return [PlannedTrial(i, start + i, instruction) for i in range(count)]


class Journal:
    """Append-only event log of one evaluation directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.events = self._read()

    def _read(self) -> list[dict]:
        """Events in order; a line cut short by a crash while writing is skipped (that event never happened)."""
        self.torn_lines = 0
        if not self.path.exists():
            return []
        events = []
        for line in self.path.read_bytes().split(b"\n"):
            if not line.strip():
                continue
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                self.torn_lines += 1
        return events

    def append(self, event: dict) -> dict:
        event = {**event, "wall_time": time.time()}
        data = (json.dumps(event, sort_keys=True) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if self.path.stat().st_size and not self._ends_with_newline(fd):
                os.write(fd, b"\n")  # close off a half-written line so the new event stays readable
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.events.append(event)
        return event

    def _ends_with_newline(self, fd: int) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def open_trials(self) -> list[dict]:
        """`start` events with no matching `end`."""
        ended = {e["trial"] for e in self.events if e["event"] == "end"}
        return [e for e in self.events if e["event"] == "start" and e["trial"] not in ended]

    def recover(self) -> list[dict]:
        """Mark every trial left open by a crash as aborted; returns the events appended."""
        return [self.append({"event": "end", "trial": e["trial"], "plan_index": e["plan_index"],
                             "seed": e.get("seed"), "outcome": "aborted",
                             "reason": "eval manager restarted: trial interrupted"}) for e in self.open_trials()]

    def next_trial_number(self) -> int:
        return 1 + max((e["trial"] for e in self.events if "trial" in e), default=-1)

    def judged(self) -> dict[int, dict]:
        """plan_index -> the `end` event that counts for it (success/failure not discarded by a redo)."""
        out: dict[int, dict] = {}
        by_trial: dict[int, dict] = {}
        for e in self.events:
            if e["event"] == "end" and e["outcome"] in ("success", "failure"):
                out[e["plan_index"]] = e
                by_trial[e["trial"]] = e
            elif e["event"] == "redo" and e.get("trial") in by_trial:
                out.pop(by_trial.pop(e["trial"])["plan_index"], None)
        return out

    def last_judged_trial(self) -> dict | None:
        judged = self.judged()
        return max(judged.values(), key=lambda e: e["trial"]) if judged else None


def given_up(journal: Journal, plan: list[PlannedTrial], max_aborts: int | None) -> dict[int, dict]:
    """plan_index -> its last aborted `end`, for each unjudged entry aborted at least `max_aborts` times."""
    if max_aborts is None:
        return {}
    judged = journal.judged()
    aborts: dict[int, list[dict]] = {}
    for e in journal.events:
        if e["event"] == "end" and e["outcome"] == "aborted" and e["plan_index"] not in judged:
            aborts.setdefault(e["plan_index"], []).append(e)
    planned = {t.index for t in plan}
    return {i: ends[-1] for i, ends in aborts.items() if len(ends) >= max_aborts and i in planned}


def next_plan_index(journal: Journal, plan: list[PlannedTrial], max_aborts: int | None = None) -> int | None:
    done = journal.judged().keys() | given_up(journal, plan, max_aborts).keys()
    return next((t.index for t in plan if t.index not in done), None)


def summarize(journal: Journal, plan: list[PlannedTrial], max_aborts: int | None = None) -> dict:
    judged = journal.judged()
    n = len(judged)
    k = sum(e["outcome"] == "success" for e in judged.values())
    aborted = [e for e in journal.events if e["event"] == "end" and e["outcome"] == "aborted"]
    lo, hi = wilson_interval(k, n)
    return {"planned": len(plan), "judged": n, "successes": k, "success_rate": k / n if n else None,
            "wilson95": [lo, hi], "aborted": len(aborted),
            "redos": sum(e["event"] == "redo" for e in journal.events),
            "given_up": [{"plan_index": i, "seed": e.get("seed"), "aborts": max_aborts, "last_reason": e.get("reason")}
                         for i, e in sorted(given_up(journal, plan, max_aborts).items())],
            "trials": [judged[i] for i in sorted(judged)]}


def given_up_note(summary: dict) -> str:
    gone = summary.get("given_up") or []
    if not gone:
        return ""
    entries = ", ".join(f"plan {g['plan_index']} ({g['last_reason']})" for g in gone)
    return f"; given up after {gone[0]['aborts']} aborts: {entries}"


def write_summary(directory: str | Path, summary: dict) -> None:
    """summary.json and a readable summary.md, each replaced atomically."""
    directory = Path(directory)
    rate = "n/a" if summary["success_rate"] is None else f"{100 * summary['success_rate']:.1f}%"
    lines = ["# Evaluation summary\n",
             f"Success {summary['successes']}/{summary['judged']} = {rate}, Wilson 95% "
             f"[{100 * summary['wilson95'][0]:.1f}%, {100 * summary['wilson95'][1]:.1f}%]; "
             f"{summary['aborted']} aborted, {summary['redos']} redone, {summary['planned']} planned"
             f"{given_up_note(summary)}.\n",
             "| plan | trial | seed | outcome | steps | interventions | reason |", "|---|---|---|---|---|---|---|"]
    for t in summary["trials"]:
        lines.append(f"| {t['plan_index']} | {t['trial']} | {t.get('seed')} | {t['outcome']} | {t.get('steps', '')} "
                     f"| {t.get('interventions', '')} | {t.get('reason', '')} |")
    for name, text in (("summary.json", json.dumps(summary, indent=2)), ("summary.md", "\n".join(lines) + "\n")):
        tmp = directory / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, directory / name)
