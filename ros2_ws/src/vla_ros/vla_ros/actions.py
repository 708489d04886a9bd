"""Normalised policy actions -> joint targets, with the semantics of the sim controller the policy learnt.

ManiSkill's Panda `pd_joint_delta_pos`: each arm entry in [-1, 1] maps linearly onto [-0.1, 0.1] rad and is
added to the joint position *measured* when the action is applied (`use_target=False`); the gripper entry
maps onto an absolute finger position in [-0.01, 0.04] m shared by both fingers (mimic joint). Any other
mapping would move the policy out of its training distribution, so the real stack uses exactly this one.
`delta_reference="target"` gives `pd_joint_target_delta_pos` (delta added to the previous target).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GRIPPER_ACTION = "gripper"
# The ManiSkill controller each delta reference reproduces; a policy trained for any other mode is refused.
CONTROL_MODES = {"measured": "pd_joint_delta_pos", "target": "pd_joint_target_delta_pos"}


def scale(a: np.ndarray, low: float, high: float) -> np.ndarray:
    """ManiSkill's clip_and_scale: [-1, 1] -> [low, high]."""
    return low + 0.5 * (high - low) * (np.clip(a, -1.0, 1.0) + 1.0)


@dataclass(frozen=True)
class ActionSemantics:
    arm_joints: tuple[str, ...]
    gripper_joints: tuple[str, ...] = ()
    arm_low: float = -0.1
    arm_high: float = 0.1
    gripper_low: float = -0.01
    gripper_high: float = 0.04
    delta_reference: str = "measured"  # "measured" (pd_joint_delta_pos) | "target" (pd_joint_target_delta_pos)

    def __post_init__(self) -> None:
        if self.delta_reference not in ("measured", "target"):
            raise ValueError(f"delta_reference must be 'measured' or 'target', got {self.delta_reference!r}")

    @property
    def control_mode(self) -> str:
        """The ManiSkill control mode these semantics execute."""
        return CONTROL_MODES[self.delta_reference]

    @property
    def action_names(self) -> tuple[str, ...]:
        return self.arm_joints + ((GRIPPER_ACTION,) if self.gripper_joints else ())

    @property
    def joints(self) -> tuple[str, ...]:
        return self.arm_joints + self.gripper_joints

    def to_targets(self, action: np.ndarray, measured: dict[str, float],
                   last_target: dict[str, float] | None = None) -> dict[str, float]:
        """Joint targets by name for one (already range-checked) action vector."""
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (len(self.action_names),):
            raise ValueError(f"action has shape {action.shape}, expected ({len(self.action_names)},)")
        ref = measured
        if self.delta_reference == "target" and last_target is not None:
            ref = last_target
        deltas = scale(action[:len(self.arm_joints)], self.arm_low, self.arm_high)
        out = {j: float(ref[j]) + float(d) for j, d in zip(self.arm_joints, deltas, strict=True)}
        if self.gripper_joints:
            g = float(scale(action[len(self.arm_joints):], self.gripper_low, self.gripper_high)[0])
            out.update({j: g for j in self.gripper_joints})
        return out


PANDA_ARM = tuple(f"panda_joint{i}" for i in range(1, 8))
PANDA_FINGERS = ("panda_finger_joint1", "panda_finger_joint2")
