"""The safety filter's decisions, without ROS: every command passes here between a source and the controller.

Order of checks for one command (joint targets by name, from the policy or from teleop):
latched e-stop -> stale joint state -> NaN/Inf -> (policy only) clip to the training action range and convert
with the controller semantics -> per-step delta limit -> velocity limit -> joint position limits with margin ->
TCP workspace box (forward kinematics of the URDF). Clipping checks modify the command and count an
intervention; the others reject it, and a rejected command becomes a hold at the last safe target. Every
intervention is counted by reason, so the diagnostics show what the filter did and why.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vla_ros.actions import ActionSemantics


class SafetyConfigError(ValueError):
    """Bad limits or workspace configuration."""


@dataclass(frozen=True)
class JointLimit:
    lower: float
    upper: float
    velocity: float


def urdf_joint_limits(urdf: str | Path) -> dict[str, JointLimit]:
    """Position and velocity limits of every revolute/prismatic joint of a URDF."""
    try:
        root = ET.parse(str(urdf)).getroot()
    except (OSError, ET.ParseError) as e:
        raise SafetyConfigError(f"cannot read URDF {urdf}: {e}") from None
    out = {}
    for j in root.iter("joint"):
        lim = j.find("limit")
        if j.get("type") in ("revolute", "prismatic") and lim is not None:
            out[j.get("name")] = JointLimit(float(lim.get("lower", "-inf")), float(lim.get("upper", "inf")),
                                            float(lim.get("velocity", "inf")))
    return out


@dataclass
class SafetyConfig:
    semantics: ActionSemantics
    limits: dict[str, JointLimit]
    limited_joints: tuple[str, ...]            # joints whose position limits are enforced (arm joints)
    control_hz: float
    action_low: np.ndarray
    action_high: np.ndarray
    position_margin: float = 0.05              # rad (or m) kept away from each position limit
    velocity_margin: float = 0.05              # fraction of the URDF velocity limit kept in reserve
    max_step_delta: float = 0.1                # largest |target - measured| per control step, rad
    workspace_low: np.ndarray | None = None    # TCP box in the robot base frame, metres
    workspace_high: np.ndarray | None = None
    stale_state_s: float = 0.25                # joint state older than this -> hold

    def __post_init__(self) -> None:
        missing = [j for j in self.limited_joints if j not in self.limits]
        if missing:
            raise SafetyConfigError(f"no URDF limits for joint(s) {', '.join(missing)}")
        if self.control_hz <= 0 or self.max_step_delta <= 0 or not 0 <= self.velocity_margin < 1:
            raise SafetyConfigError("control_hz and max_step_delta must be > 0, velocity_margin in [0, 1)")
        if (self.workspace_low is None) != (self.workspace_high is None):
            raise SafetyConfigError("give both workspace_low and workspace_high, or neither")
        if self.workspace_low is not None and not np.all(np.asarray(self.workspace_low)
                                                         < np.asarray(self.workspace_high)):
            raise SafetyConfigError("workspace_low must be below workspace_high on every axis")


@dataclass
class Decision:
    """`targets` is what goes to the controller; `hold` says it is a hold, `reasons` why it differs."""

    targets: dict[str, float] | None
    hold: bool
    reasons: list[str] = field(default_factory=list)


class SafetyFilter:
    """Stateful filter: remembers the last safe target (the hold point) and the latched e-stop."""

    def __init__(self, cfg: SafetyConfig, fk=None):
        self.cfg = cfg
        self.fk = fk  # callable: joint positions by name -> 4x4 base_T_tcp, or None (no workspace check)
        if cfg.workspace_low is not None and fk is None:
            raise SafetyConfigError("a workspace box needs forward kinematics")
        self.counts: Counter[str] = Counter()
        self.estop_reason: str | None = None
        self.last_safe: dict[str, float] | None = None
        self.dt = 1.0 / cfg.control_hz

    # ----- e-stop ------------------------------------------------------------------------------------------------
    def trigger_estop(self, reason: str) -> None:
        if self.estop_reason is None:
            self.estop_reason = reason
            self.counts["estop"] += 1

    def rebase(self, measured: dict[str, float]) -> None:
        """Make the current position the hold point (after a scene reset or a change of command source)."""
        self.last_safe = {j: float(measured[j]) for j in self.cfg.semantics.joints if j in measured} or None

    def reset_estop(self) -> None:
        """Only an explicit reset clears the latch; the arm keeps holding until the next valid command."""
        self.estop_reason = None

    # ----- decisions -----------------------------------------------------------------------------------------------
    def hold(self, measured: dict[str, float] | None, reason: str, intervention: bool = True) -> Decision:
        """Hold at the last safe target (or where the arm is, if nothing was commanded yet).

        `intervention=False` for holds that are part of normal operation (a change of command source).
        """
        if intervention:
            self.counts[reason] += 1
        if self.last_safe is None and measured is not None:
            self.last_safe = {j: float(measured[j]) for j in self.cfg.semantics.joints if j in measured}
        return Decision(dict(self.last_safe) if self.last_safe else None, True, [reason] if intervention else [])

    def policy_action(self, action: np.ndarray, measured: dict[str, float] | None, state_age_s: float) -> Decision:
        """A normalised policy action -> safe joint targets, or a hold."""
        pre = self._precheck(measured, state_age_s)
        if pre is not None:
            return pre
        a = np.asarray(action, dtype=np.float64)
        if a.shape != self.cfg.action_low.shape:
            return self.hold(measured, "bad_action_shape")
        if not np.isfinite(a).all():
            return self.hold(measured, "non_finite")
        reasons = []
        clipped = np.clip(a, self.cfg.action_low, self.cfg.action_high)
        if not np.array_equal(clipped, a):
            reasons.append("action_clipped")
        targets = self.cfg.semantics.to_targets(clipped, measured, self.last_safe)
        return self._check_targets(targets, measured, reasons)

    def joint_command(self, targets: dict[str, float], measured: dict[str, float] | None,
                      state_age_s: float) -> Decision:
        """Absolute joint targets by name (teleop, going home) -> safe joint targets, or a hold."""
        pre = self._precheck(measured, state_age_s)
        if pre is not None:
            return pre
        values = [targets.get(j) for j in self.cfg.semantics.joints]
        if any(v is None for v in values):
            return self.hold(measured, "missing_joint")
        if not all(math.isfinite(v) for v in values):
            return self.hold(measured, "non_finite")
        return self._check_targets({j: float(targets[j]) for j in self.cfg.semantics.joints}, measured, [])

    # ----- internals ---------------------------------------------------------------------------------------------
    def _precheck(self, measured: dict[str, float] | None, state_age_s: float) -> Decision | None:
        if self.estop_reason is not None:
            return self.hold(measured, "estop_latched")
        if measured is None or any(j not in measured for j in self.cfg.semantics.joints):
            return self.hold(measured, "no_joint_state")
        if state_age_s > self.cfg.stale_state_s:
            return self.hold(measured, "stale_joint_state")
        return None

    def _check_targets(self, targets: dict[str, float], measured: dict[str, float], reasons: list[str]) -> Decision:
        cfg = self.cfg
        out = dict(targets)
        for j in cfg.semantics.arm_joints:
            delta = out[j] - measured[j]
            step = min(cfg.max_step_delta, cfg.limits[j].velocity * (1 - cfg.velocity_margin) * self.dt
                       if j in cfg.limits else cfg.max_step_delta)
            if abs(delta) > step + 1e-9:  # the policy's own bound is exactly max_step_delta
                out[j] = measured[j] + math.copysign(step, delta)
                reasons.append("step_limited" if step == cfg.max_step_delta else "velocity_limited")
        for j in cfg.limited_joints:
            lo, hi = cfg.limits[j].lower + cfg.position_margin, cfg.limits[j].upper - cfg.position_margin
            if not lo <= out[j] <= hi:
                out[j] = min(max(out[j], lo), hi)
                reasons.append("position_limited")
        if cfg.workspace_low is not None:
            tcp = self.fk(out)[:3, 3]
            if np.any(tcp < cfg.workspace_low) or np.any(tcp > cfg.workspace_high):
                return self.hold(measured, "workspace")
        for r in reasons:
            self.counts[r] += 1
        self.last_safe = out
        return Decision(out, False, reasons)
