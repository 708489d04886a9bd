"""Collects what the policy saw and did during one trial and turns it into an episode of the project's format.

The policy node publishes, for every executed step, a record [step, stamp, state..., action...] and the
resized image per camera (frame_id "<camera>#<step>"); steps are paired by number, so a camera frame that
was reused for two control steps is stored twice, as the policy saw it.
"""

from __future__ import annotations

import threading

import numpy as np

from policy_runtime.contract import PolicySpec
from policy_runtime.episodes import Episode


class TrialRecorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.recording = False
        self.steps: dict[int, tuple[float, np.ndarray, np.ndarray]] = {}
        self.images: dict[tuple[str, int], np.ndarray] = {}

    def start(self) -> None:
        with self.lock:
            self.recording, self.steps, self.images = True, {}, {}

    def stop(self) -> None:
        with self.lock:
            self.recording = False

    def add_step(self, data: list[float], state_dim: int) -> None:
        with self.lock:
            if self.recording:
                step, stamp = int(data[0]), float(data[1])
                self.steps[step] = (stamp, np.asarray(data[2:2 + state_dim], np.float32),
                                    np.asarray(data[2 + state_dim:], np.float32))

    def add_image(self, frame_id: str, rgb: np.ndarray) -> None:
        cam, _, step = frame_id.rpartition("#")
        with self.lock:
            if self.recording and cam and step.isdigit():
                self.images[(cam, int(step))] = rgb

    def __len__(self) -> int:
        return len(self.steps)

    def kept_steps(self, cameras: list[str]) -> list[int]:
        """The step numbers an episode keeps: those with every camera's image, in order."""
        with self.lock:
            return [s for s in sorted(self.steps) if all((c, s) in self.images for c in cameras)]

    def episode(self, spec: PolicySpec, instruction: str, success: bool, source: str,
                provenance: dict) -> Episode:
        """Steps that have every camera's image, in order (a record whose image was lost is dropped)."""
        cams = [c.name for c in spec.cameras]
        order = self.kept_steps(cams)
        with self.lock:
            stamps = np.asarray([self.steps[s][0] for s in order], np.float64)
            state = np.stack([self.steps[s][1] for s in order]) if order else np.zeros((0, spec.state_dim), np.float32)
            actions = np.stack([self.steps[s][2] for s in order]) if order else np.zeros((0, spec.action_dim),
                                                                                         np.float32)
            images = {c: np.stack([self.images[(c, s)] for s in order]) if order else
                      np.zeros((0, next(x.height for x in spec.cameras if x.name == c),
                                next(x.width for x in spec.cameras if x.name == c), 3), np.uint8) for c in cams}
        return Episode(state=state, actions=actions, images=images, instruction=instruction, success=success,
                       control_hz=spec.control_hz, source=source, task=spec.task, control_mode=spec.control_mode,
                       state_layout=spec.state_layout, provenance=provenance,
                       timestamps=stamps - stamps[0] if len(stamps) else stamps)
