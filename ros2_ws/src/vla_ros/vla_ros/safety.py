"""The safety filter's decisions, without ROS: every command passes here between a source and the controller.

Order of checks for one command (joint targets by name, from the policy or from teleop):
latched e-stop -> stale joint state -> NaN/Inf -> (policy only) clip to the training action range and convert
with the controller semantics -> (arm) per-step delta and velocity limit against the measured position ->
position limits (arm joints with margin, fingers at their URDF range) -> rate limit against the previous
command (URDF velocity, and the optional acceleration limits) -> TCP workspace box (forward kinematics of the
URDF). Every joint the filter publishes, fingers included, passes the position and rate limits, so neither an
oscillating policy nor a wild teleop command can make consecutive commands, or the published velocity field,
exceed the joint's velocity limit. Clipping checks modify the command and count an intervention; the others
reject it, and a rejected command becomes a hold at the last safe target. Every intervention is counted by
reason, so the diagnostics show what the filter did and why.
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
    limits: dict[str, JointLimit]               # every joint the filter publishes needs one
    control_hz: float
    action_low: np.ndarray
    action_high: np.ndarray
    position_margin: float = 0.05              # rad (or m) kept away from each position limit
    velocity_margin: float = 0.05              # fraction of the URDF velocity limit kept in reserve
    max_step_delta: float = 0.1                # largest |target - measured| per control step, rad
    workspace_low: np.ndarray | None = None    # TCP box in the robot base frame, metres
    workspace_high: np.ndarray | None = None
    stale_state_s: float = 0.25                # joint state older than this -> hold
    acceleration_limits: np.ndarray | None = None  # rad/s^2 per arm joint between consecutive commands, or None

    def __post_init__(self) -> None:
        missing = [j for j in self.semantics.joints if j not in self.limits]
        if missing:
            raise SafetyConfigError(f"no URDF limits for joint(s) {', '.join(missing)}")
        if self.control_hz <= 0 or self.max_step_delta <= 0 or not 0 <= self.velocity_margin < 1:
            raise SafetyConfigError("control_hz and max_step_delta must be > 0, velocity_margin in [0, 1)")
        if self.acceleration_limits is not None:
            acc = np.asarray(self.acceleration_limits, dtype=np.float64)
            if acc.shape != (len(self.semantics.arm_joints),) or not np.all(np.isfinite(acc) & (acc > 0)):
                raise SafetyConfigError(f"acceleration_limits need {len(self.semantics.arm_joints)} finite values "
                                        f"> 0 (one per arm joint), got {list(acc.ravel())}")
        if (self.workspace_low is None) != (self.workspace_high is None):
            raise SafetyConfigError("give both workspace_low and workspace_high, or neither")
        if self.workspace_low is not None and not np.all(np.asarray(self.workspace_low)
                                                         < np.asarray(self.workspace_high)):
            raise SafetyConfigError("workspace_low must be below workspace_high on every axis")

    def max_velocity(self, joint: str) -> float:
        """The fastest any joint may be commanded to move: its URDF velocity limit less the margin."""
        return self.limits[joint].velocity * (1 - self.velocity_margin)

    def position_range(self, joint: str) -> tuple[float, float]:
        """Arm joints keep `position_margin` (rad) from their limits; fingers (metres) may use their whole range."""
        margin = self.position_margin if joint in self.semantics.arm_joints else 0.0
        return self.limits[joint].lower + margin, self.limits[joint].upper - margin


@dataclass
class Decision:
    """`targets` is what goes to the controller; `hold` says it is a hold, `reasons` why it differs.

    `velocities` is the trajectory's velocity field: the change from the previous command over one period
    (zero for a hold), never above a joint's velocity limit.
    """

    targets: dict[str, float] | None
    hold: bool
    reasons: list[str] = field(default_factory=list)
    velocities: dict[str, float] = field(default_factory=dict)


class SafetyFilter:
    """Stateful filter: remembers the last safe target (the hold point), the previous command and its velocity
    (the reference of the rate limits), and the latched e-stop."""

    def __init__(self, cfg: SafetyConfig, fk=None):
        self.cfg = cfg
        self.fk = fk  # callable: joint positions by name -> 4x4 base_T_tcp, or None (no workspace check)
        if cfg.workspace_low is not None and fk is None:
            raise SafetyConfigError("a workspace box needs forward kinematics")
        self.counts: Counter[str] = Counter()
        self.estop_reason: str | None = None
        self.last_safe: dict[str, float] | None = None
        self.last_command: dict[str, float] | None = None  # what the controller was last sent (a hold included)
        self.last_velocity: dict[str, float] = {}  # of the previous command; empty after a hold (standing still)
        self.dt = 1.0 / cfg.control_hz
        acc = cfg.acceleration_limits
        self.max_accel = {} if acc is None else dict(zip(cfg.semantics.arm_joints, map(float, acc), strict=True))

    # ----- e-stop ------------------------------------------------------------------------------------------------
    def trigger_estop(self, reason: str) -> None:
        if self.estop_reason is None:
            self.estop_reason = reason
            self.counts["estop"] += 1

    def rebase(self, measured: dict[str, float]) -> None:
        """Make the current position the hold point (after a scene reset or a change of command source).

        The previous command stays the reference of the rate limits: the controller is still executing it.
        """
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
        targets = dict(self.last_safe) if self.last_safe else None
        if targets is not None:
            self.last_command, self.last_velocity = targets, {}
        return Decision(targets, True, [reason] if intervention else [], dict.fromkeys(targets or (), 0.0))

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
        for j in self.cfg.semantics.gripper_joints:
            # The sim controller closes towards -0.01 m, below the fingers' range, so that they squeeze: on the
            # robot that is the closed limit. Part of the conversion, not an intervention.
            lo, hi = self.cfg.position_range(j)
            targets[j] = min(max(targets[j], lo), hi)
        return self._check_targets(targets, measured, reasons)

    def policy_chunk(self, actions: np.ndarray, measured: dict[str, float] | None,
                     state_age_s: float) -> list[Decision]:
        """A chunk of normalised actions -> one safe target per control step, for one timed trajectory.

        Every point passes the same checks as `policy_action`, against the previous point's target as the
        position the arm will be at (the trajectory controller tracks it; the first point against the measured
        position). The trajectory stops before the first point the checks reject (counted, as a hold would be):
        the validated remainder. A chunk that cannot start (stale state, e-stop, a rejected first point) is a hold.
        """
        pre = self._precheck(measured, state_age_s)
        if pre is not None:
            return [pre]
        a = np.asarray(actions, dtype=np.float64)
        if a.ndim != 2 or not len(a):
            return [self.hold(measured, "bad_action_shape")]
        points: list[Decision] = []
        at = dict(measured)
        for action in a:
            d = self.policy_action(action, at, 0.0)
            if d.hold:
                return points or [d]
            points.append(d)
            at.update(d.targets)
        return points

    def cut(self, targets: dict[str, float]) -> None:
        """A trajectory sent ahead is being replaced while the arm is at `targets`: hold there, not at its end."""
        self.last_safe = self.last_command = dict(targets)
        self.last_velocity = {}

    def joint_command(self, targets: dict[str, float], measured: dict[str, float] | None,
                      state_age_s: float) -> Decision:
        """Absolute joint targets by name (teleop, going home) -> safe joint targets, or a hold.

        A command may name a subset of the joints (the home pose names the arm only): the others keep their
        previous command. A joint the filter does not command is refused, so a misnamed pose never half-runs.
        """
        pre = self._precheck(measured, state_age_s)
        if pre is not None:
            return pre
        if any(j not in self.cfg.semantics.joints for j in targets):
            return self.hold(measured, "unknown_joint")
        if not all(math.isfinite(v) for v in targets.values()):
            return self.hold(measured, "non_finite")
        prev = self._previous(measured)
        return self._check_targets({j: float(targets.get(j, prev[j])) for j in self.cfg.semantics.joints},
                                   measured, [])

    # ----- internals ---------------------------------------------------------------------------------------------
    def _precheck(self, measured: dict[str, float] | None, state_age_s: float) -> Decision | None:
        if self.estop_reason is not None:
            return self.hold(measured, "estop_latched")
        if measured is None or any(j not in measured for j in self.cfg.semantics.joints):
            return self.hold(measured, "no_joint_state")
        if state_age_s > self.cfg.stale_state_s:
            return self.hold(measured, "stale_joint_state")
        return None

    def _previous(self, measured: dict[str, float]) -> dict[str, float]:
        """The previous command of every joint (where the arm is, for a joint never commanded)."""
        return {**measured, **(self.last_command or {})}

    def _tracking_step(self, joint: str) -> float:
        """The largest |target - measured| of an arm joint in one control period."""
        return min(self.cfg.max_step_delta, self.cfg.max_velocity(joint) * self.dt)

    def _check_targets(self, targets: dict[str, float], measured: dict[str, float], reasons: list[str]) -> Decision:
        cfg = self.cfg
        out = dict(targets)
        for j in cfg.semantics.arm_joints:
            delta = out[j] - measured[j]
            step = self._tracking_step(j)
            if abs(delta) > step + 1e-9:  # the policy's own bound is exactly max_step_delta
                out[j] = measured[j] + math.copysign(step, delta)
                reasons.append("step_limited" if step == cfg.max_step_delta else "velocity_limited")
        prev = self._previous(measured)
        velocities = {}
        for j in cfg.semantics.joints:
            lo, hi = cfg.position_range(j)
            if not lo <= out[j] <= hi:
                out[j] = min(max(out[j], lo), hi)
                reasons.append("position_limited")
            t = prev[j] + self._rate_limit(j, out[j], prev[j], reasons) * self.dt
            if j in cfg.semantics.arm_joints:
                # A previous command the arm is far from (the scene was reset under it) must not pull the
                # target away from the arm: the tracking bound wins over the rate limit.
                step = self._tracking_step(j)
                t = min(max(t, measured[j] - step), measured[j] + step)
            out[j] = min(max(t, lo), hi)
            velocities[j] = (out[j] - prev[j]) / self.dt
        if cfg.workspace_low is not None:
            tcp = self.fk(out)[:3, 3]
            if np.any(tcp < cfg.workspace_low) or np.any(tcp > cfg.workspace_high):
                return self.hold(measured, "workspace")
        for r in reasons:
            self.counts[r] += 1
        self.last_safe = self.last_command = out
        self.last_velocity = velocities
        vmax = {j: cfg.max_velocity(j) for j in out}
        return Decision(out, False, reasons, {j: min(max(v, -vmax[j]), vmax[j]) for j, v in velocities.items()})

    def _rate_limit(self, joint: str, target: float, prev: float, reasons: list[str]) -> float:
        """The velocity that moves `joint` from the previous command towards `target` within the limits.

        Velocity: |v| <= the URDF limit less the margin, whatever the measured position did (an oscillating
        policy). Acceleration (if configured): |v - v_prev| <= a * dt, and no faster than allows stopping at the
        target with that deceleration, so a fixed goal (home) is reached without overshoot.
        """
        wanted = (target - prev) / self.dt
        v, vmax = wanted, self.cfg.max_velocity(joint)
        a = self.max_accel.get(joint)
        if a is not None:
            v0, da = self.last_velocity.get(joint, 0.0), a * self.dt
            braking = da * (math.sqrt(0.25 + 2 * abs(target - prev) / (da * self.dt)) - 0.5)
            v = min(max(math.copysign(min(abs(v), braking), v), v0 - da), v0 + da)
        v = min(max(v, -vmax), vmax)
        if abs(v - wanted) * self.dt > 1e-9:
            reasons.append("rate_limited" if abs(wanted) > vmax else "acceleration_limited")
        return v
