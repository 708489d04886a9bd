"""Normalised policy actions -> joint targets, with the semantics of the sim controller the policy learnt.

The semantics are the contract's (policy_runtime.contract.ControllerSemantics, received in the handshake):
for ManiSkill's Panda `pd_joint_delta_pos` each arm entry in [-1, 1] maps linearly onto `arm_delta` rad and is
added to the joint position *measured* when the action is applied (`use_target=False`); the gripper entry
maps onto an absolute finger position in `gripper_range` m shared by both fingers (mimic joint). Any other
mapping would move the policy out of its training distribution, so the real stack uses exactly this one.
`pd_joint_target_delta_pos` adds the delta to the previous target instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policy_runtime.contract import (
    ARM_DELTA,
    DELTA_REFERENCE,
    GRIPPER_ACTION,
    GRIPPER_RANGE,
    PANDA_ARM_JOINTS,
    PANDA_FINGER_JOINTS,
    ControllerSemantics,
)

# The ManiSkill controller each delta reference reproduces; a policy trained for any other mode is refused.
CONTROL_MODES = {ref: mode for mode, ref in DELTA_REFERENCE.items()}


def scale(a: np.ndarray, low: float, high: float) -> np.ndarray:
    """ManiSkill's clip_and_scale: [-1, 1] -> [low, high]."""
    return low + 0.5 * (high - low) * (np.clip(a, -1.0, 1.0) + 1.0)


@dataclass(frozen=True)
class ActionSemantics:
    """The contract's controller semantics bound to this robot's joint names (arm and the gripper's fingers)."""

    arm_joints: tuple[str, ...]
    gripper_joints: tuple[str, ...] = ()
    arm_low: float = ARM_DELTA[0]
    arm_high: float = ARM_DELTA[1]
    gripper_low: float = GRIPPER_RANGE[0]
    gripper_high: float = GRIPPER_RANGE[1]
    delta_reference: str = "measured"  # "measured" (pd_joint_delta_pos) | "target" (pd_joint_target_delta_pos)

    def __post_init__(self) -> None:
        if self.delta_reference not in CONTROL_MODES:
            raise ValueError(f"delta_reference must be 'measured' or 'target', got {self.delta_reference!r}")
        for name, lo, hi in (("arm_delta", self.arm_low, self.arm_high),
                             ("gripper_range", self.gripper_low, self.gripper_high)):
            if not (np.isfinite([lo, hi]).all() and lo < hi):
                raise ValueError(f"policy {name} {[lo, hi]} must be finite with low < high")

    @classmethod
    def from_controller(cls, c: ControllerSemantics, gripper_joints: tuple[str, ...]) -> ActionSemantics:
        """Execute the contract's controller on this robot; a control mode it cannot execute is a ValueError."""
        if c.delta_reference is None:
            raise ValueError(f"policy control_mode {c.control_mode!r} is not one the safety filter executes "
                             f"({', '.join(repr(m) for m in DELTA_REFERENCE)})")
        return cls(c.arm_joints, gripper_joints if GRIPPER_ACTION in c.action_joints else (), *c.arm_delta,
                   *c.gripper_range, delta_reference=c.delta_reference)

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


PANDA_ARM, PANDA_FINGERS = PANDA_ARM_JOINTS, PANDA_FINGER_JOINTS
