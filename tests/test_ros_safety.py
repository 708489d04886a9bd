"""Safety filter core, action semantics and forward kinematics (no DDS; the semantics checked against ManiSkill)."""

from __future__ import annotations

import numpy as np
import pytest
from vla_ros.actions import PANDA_ARM, PANDA_FINGERS, ActionSemantics
from vla_ros.robot import RobotModel
from vla_ros.safety import SafetyConfig, SafetyConfigError, SafetyFilter

from tests.ros_fixtures import ROOT  # noqa: F401  (puts vla_ros on the path)

REST = dict(zip(PANDA_ARM + PANDA_FINGERS, [0.0, np.pi / 8, 0.0, -5 * np.pi / 8, 0.0, 3 * np.pi / 4, np.pi / 4,
                                             0.04, 0.04], strict=True))
SEM = ActionSemantics(PANDA_ARM, PANDA_FINGERS)
NAMES = PANDA_ARM + PANDA_FINGERS


@pytest.fixture(scope="module")
def robot() -> RobotModel:
    return RobotModel()


def make_filter(robot: RobotModel, **kw) -> SafetyFilter:
    cfg = SafetyConfig(SEM, robot.limits, 20.0, -np.ones(8), np.ones(8), **kw)
    return SafetyFilter(cfg, robot.base_T_tcp)


def tcp(robot: RobotModel, q: dict) -> np.ndarray:
    return robot.base_T_tcp(q)[:3, 3]


def test_valid_action_becomes_joint_targets(robot):
    f = make_filter(robot)
    a = np.array([0.5, -0.5, 0, 0, 0, 0, 0, 1.0])
    d = f.policy_action(a, REST, state_age_s=0.0)
    assert not d.hold and d.reasons == []
    assert d.targets["panda_joint1"] == pytest.approx(REST["panda_joint1"] + 0.05)
    assert d.targets["panda_joint2"] == pytest.approx(REST["panda_joint2"] - 0.05)
    assert d.targets["panda_finger_joint1"] == pytest.approx(0.04) == d.targets["panda_finger_joint2"]
    assert d.velocities["panda_joint1"] == pytest.approx(0.05 * 20) and d.velocities["panda_finger_joint1"] == 0


def vmax(robot: RobotModel, joint: str, margin: float = 0.05) -> float:
    return robot.limits[joint].velocity * (1 - margin)


ROBOT_ACCEL = np.array([15.0, 7.5, 10.0, 12.5, 15.0, 20.0, 20.0])  # launch/config/robot_eval.yaml
ROBOT_LIMITS = {"velocity_margin": 0.2, "position_margin": 0.1, "acceleration_limits": ROBOT_ACCEL}


@pytest.mark.parametrize("kw", [{}, ROBOT_LIMITS], ids=["defaults", "robot_margins"])
def test_oscillating_policy_is_bounded_against_the_previous_command(robot, kw):
    """+1/-1 every step while the arm lags (measured stays put): each measured-relative target is legal, but
    consecutive commands must not jump by twice the step, nor publish a velocity field above the limit."""
    f, dt, margin = make_filter(robot, **kw), 1 / 20, kw.get("velocity_margin", 0.05)
    prev, prev_v = dict(REST), dict.fromkeys(REST, 0.0)
    for k in range(20):
        d = f.policy_action(np.full(8, 1.0 if k % 2 == 0 else -1.0), REST, 0.0)
        assert not d.hold
        for j in NAMES:
            assert abs(d.targets[j] - prev[j]) <= vmax(robot, j, margin) * dt + 1e-9, (k, j)
            assert abs(d.velocities[j]) <= vmax(robot, j, margin) + 1e-9, (k, j)
            assert d.velocities[j] == pytest.approx((d.targets[j] - prev[j]) / dt)
            lo, hi = robot.limits[j].lower, robot.limits[j].upper
            assert lo <= d.targets[j] <= hi
        if "acceleration_limits" in kw:
            for j, a in zip(PANDA_ARM, ROBOT_ACCEL, strict=True):
                assert abs(d.velocities[j] - prev_v[j]) <= a * dt + 1e-9, (k, j)
        prev, prev_v = d.targets, d.velocities
    assert f.counts["rate_limited" if not kw else "acceleration_limited"] > 0


def test_rate_reference_is_the_previous_command_but_never_pulls_away_from_the_arm(robot):
    f, step = make_filter(robot), vmax(robot, "panda_joint1") / 20
    x = f.joint_command({**REST, "panda_joint1": 0.08}, REST, 0.0).targets["panda_joint1"]
    lagging = {**REST, "panda_joint1": 0.0}
    f.rebase(lagging)  # a change of command source: the controller still runs the previous command
    d = f.joint_command({**REST, "panda_joint1": -1.0}, lagging, 0.0)
    assert d.targets["panda_joint1"] == pytest.approx(x - step) and "rate_limited" in d.reasons
    teleported = {**REST, "panda_joint1": 1.0}  # the scene was reset under the last command
    d = f.joint_command({**REST, "panda_joint1": 1.0}, teleported, 0.0)
    assert abs(d.targets["panda_joint1"] - 1.0) <= 0.1 + 1e-9 and abs(d.velocities["panda_joint1"]) <= step * 20


def test_finger_targets_out_of_range_are_clipped_and_counted(robot):
    f = make_filter(robot)
    step = vmax(robot, "panda_finger_joint1") / 20
    d = f.joint_command({**REST, "panda_finger_joint1": 1000.0, "panda_finger_joint2": -1000.0}, REST, 0.0)
    assert not d.hold and d.reasons.count("position_limited") == 2 and "rate_limited" in d.reasons
    assert d.targets["panda_finger_joint1"] == pytest.approx(0.04)  # already open: clipped to the upper limit
    assert d.targets["panda_finger_joint2"] == pytest.approx(0.04 - step)  # towards 0, at the velocity limit
    assert f.counts["position_limited"] == 2
    for _ in range(10):
        d = f.joint_command({**REST, "panda_finger_joint1": -1000.0, "panda_finger_joint2": -1000.0}, REST, 0.0)
    assert d.targets["panda_finger_joint1"] == 0.0 == d.targets["panda_finger_joint2"]


def test_policy_gripper_close_is_the_closed_limit_reached_at_finger_speed(robot):
    """The training's -0.01 m closing target becomes 0 m (the range), not counted; the motion is rate limited."""
    f = make_filter(robot)
    step, fingers = vmax(robot, "panda_finger_joint1") / 20, []
    for _ in range(8):
        d = f.policy_action(np.array([0, 0, 0, 0, 0, 0, 0, -1.0]), REST, 0.0)
        fingers.append(d.targets["panda_finger_joint1"])
    assert fingers[0] == pytest.approx(0.04 - step) and fingers[-1] == 0.0 and min(fingers) == 0.0
    assert "position_limited" not in f.counts and f.counts["rate_limited"] == 2 * 4


def follow(f: SafetyFilter, command: dict, steps: int) -> list[dict]:
    """Drive a perfectly tracking arm (measured = the previous command) with one fixed command."""
    q, out = dict(REST), []
    for _ in range(steps):
        d = f.joint_command(command, q, 0.0)
        assert not d.hold, d.reasons
        out.append(d)
        q = {**q, **d.targets}
    return out


HOME = dict(zip(PANDA_ARM, [0.0, 0.3927, 0.0, -1.9635, 0.0, 2.3562, 0.7854], strict=True))  # robot_eval.yaml


def test_home_pose_of_the_arm_joints_alone_is_accepted(robot):
    """The eval manager's home pose names the arm joints only: the fingers keep their previous command."""
    far = {**REST, "panda_joint1": 0.5, "panda_joint4": -2.3, "panda_joint6": 2.6}
    f = make_filter(robot, velocity_margin=0.2, position_margin=0.1)
    f.rebase(far)
    q = dict(far)
    for _ in range(40):
        d = f.joint_command(HOME, q, 0.0)
        assert not d.hold and d.targets["panda_finger_joint1"] == 0.04
        q = {**q, **d.targets}
    assert all(q[j] == pytest.approx(HOME[j]) for j in PANDA_ARM)
    d = f.joint_command({**HOME, "panda_joint8": 0.0}, q, 0.0)
    assert d.hold and d.reasons == ["unknown_joint"]


def test_acceleration_limits_reach_a_goal_without_overshoot(robot):
    f = make_filter(robot, velocity_margin=0.2, acceleration_limits=ROBOT_ACCEL, max_step_delta=0.5)
    goal = {**REST, "panda_joint2": REST["panda_joint2"] + 0.6, "panda_joint1": REST["panda_joint1"] - 0.3}
    path = follow(f, goal, 40)
    v = np.array([[d.velocities[j] for j in PANDA_ARM] for d in path])
    assert np.all(np.abs(np.diff(v, axis=0, prepend=0.0)) <= ROBOT_ACCEL * 0.05 + 1e-9)
    j2 = [d.targets["panda_joint2"] for d in path]
    assert j2[-1] == pytest.approx(goal["panda_joint2"]) and max(j2) <= goal["panda_joint2"] + 0.005
    assert f.counts["acceleration_limited"] > 0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_action_holds_at_last_safe_target(robot, bad):
    f = make_filter(robot)
    ok = f.policy_action(np.full(8, 0.2), REST, 0.0)
    a = np.zeros(8)
    a[3] = bad
    d = f.policy_action(a, REST, 0.0)
    assert d.hold and d.reasons == ["non_finite"] and d.targets == ok.targets
    assert f.counts["non_finite"] == 1


def test_action_clipped_to_training_range(robot):
    f = make_filter(robot)
    big = f.policy_action(np.full(8, 3.0), REST, 0.0)
    f2 = make_filter(robot)
    one = f2.policy_action(np.ones(8), REST, 0.0)
    assert "action_clipped" in big.reasons and big.targets == one.targets and not big.hold


def test_step_and_velocity_limits(robot):
    cmd = {**REST, "panda_joint1": REST["panda_joint1"] + 1.0, "panda_joint6": REST["panda_joint6"] - 1.0}
    d = make_filter(robot).joint_command(cmd, REST, 0.0)
    assert d.targets["panda_joint1"] == pytest.approx(REST["panda_joint1"] + 0.1)
    assert d.targets["panda_joint6"] == pytest.approx(REST["panda_joint6"] - 0.1)
    assert d.reasons.count("step_limited") == 2
    # With a loose step limit the URDF velocity limit (minus margin) over one control period applies.
    d = make_filter(robot, max_step_delta=1.0).joint_command(cmd, REST, 0.0)
    assert d.targets["panda_joint1"] == pytest.approx(REST["panda_joint1"] + 2.175 * 0.95 / 20)
    assert "velocity_limited" in d.reasons


def test_joint_position_limits_with_margin(robot):
    near = {**REST, "panda_joint1": 2.88}
    d = make_filter(robot).policy_action(np.array([1.0, 0, 0, 0, 0, 0, 0, 0]), near, 0.0)
    assert d.targets["panda_joint1"] == pytest.approx(2.8973 - 0.05)
    assert "position_limited" in d.reasons and not d.hold


def test_workspace_box_from_urdf_fk(robot):
    p = tcp(robot, REST)
    f = make_filter(robot, workspace_low=p - 0.02, workspace_high=p + 0.02)
    small = f.joint_command({**REST, "panda_joint1": REST["panda_joint1"] + 0.01}, REST, 0.0)
    assert not small.hold
    out = {**REST, "panda_joint1": REST["panda_joint1"] + 0.1}
    assert np.abs(tcp(robot, out) - p).max() > 0.02  # the command really leaves the box
    d = f.joint_command(out, REST, 0.0)
    assert d.hold and d.reasons == ["workspace"] and d.targets == small.targets


def test_estop_latches_until_explicit_reset(robot):
    f = make_filter(robot)
    f.rebase(REST)
    f.trigger_estop("test")
    for _ in range(5):
        d = f.policy_action(np.zeros(8), REST, 0.0)
        assert d.hold and d.reasons == ["estop_latched"]
    f.trigger_estop("again")  # a second trigger keeps the first reason
    assert f.estop_reason == "test" and f.counts["estop"] == 1
    f.reset_estop()
    assert not f.policy_action(np.zeros(8), REST, 0.0).hold


def test_stale_or_missing_joint_state_holds(robot):
    f = make_filter(robot)
    assert f.policy_action(np.zeros(8), REST, state_age_s=1.0).reasons == ["stale_joint_state"]
    partial = {k: v for k, v in REST.items() if k != "panda_joint4"}
    assert f.policy_action(np.zeros(8), partial, 0.0).reasons == ["no_joint_state"]


def test_bad_configuration_is_refused(robot):
    with pytest.raises(SafetyConfigError, match="workspace_low must be below"):
        make_filter(robot, workspace_low=np.ones(3), workspace_high=np.zeros(3))
    with pytest.raises(SafetyConfigError, match="no URDF limits"):
        SafetyConfig(SEM, {}, 20.0, -np.ones(8), np.ones(8))
    limits = {j: v for j, v in robot.limits.items() if j != "panda_finger_joint2"}
    with pytest.raises(SafetyConfigError, match="no URDF limits for joint.s. panda_finger_joint2"):
        SafetyConfig(SEM, limits, 20.0, -np.ones(8), np.ones(8))  # every published joint is limit-checked
    with pytest.raises(SafetyConfigError, match="acceleration_limits need 7"):
        make_filter(robot, acceleration_limits=np.ones(3))


@pytest.fixture(scope="module")
def maniskill_env():
    from sim_trainer.envs.make import make_maniskill_env
    from sim_trainer.envs.spec import EnvConfig

    env = make_maniskill_env(EnvConfig(task="PushCube-v1", obs_mode="state"), control_mode="pd_joint_delta_pos",
                             obs_mode="state_dict", max_episode_steps=1000)
    yield env
    env.close()


def test_action_semantics_equal_maniskill_controller(maniskill_env):
    """The real stack's targets are exactly the targets ManiSkill's pd_joint_delta_pos sets in training."""
    import torch

    env, rng = maniskill_env, np.random.default_rng(0)
    raw, _ = env.reset(seed=3)
    ctrl = env.unwrapped.agent.controller.controllers
    for _ in range(10):
        q = dict(zip(PANDA_ARM + PANDA_FINGERS, raw["agent"]["qpos"][0].numpy().astype(float), strict=True))
        a = rng.uniform(-1.2, 1.2, 8)
        raw, *_ = env.step(torch.as_tensor(a[None], dtype=torch.float32))
        ours = SEM.to_targets(np.clip(a, -1, 1), q)
        np.testing.assert_allclose([ours[j] for j in PANDA_ARM], ctrl["arm"]._target_qpos[0].numpy(), atol=1e-5)
        np.testing.assert_allclose([ours[j] for j in PANDA_FINGERS], ctrl["gripper"]._target_qpos[0].numpy(),
                                   atol=1e-5)


def test_fk_tcp_pose_equals_maniskill_observation(maniskill_env):
    import torch

    env, rng = maniskill_env, np.random.default_rng(1)
    robot = RobotModel(base_pose=[-0.615, 0, 0, 1, 0, 0, 0])
    raw, _ = env.reset(seed=5)
    for _ in range(10):
        raw, *_ = env.step(torch.as_tensor(rng.uniform(-1, 1, (1, 8)), dtype=torch.float32))
        q = dict(zip(PANDA_ARM + PANDA_FINGERS, raw["agent"]["qpos"][0].numpy().astype(float), strict=True))
        np.testing.assert_allclose(robot.tcp_pose_world(q), raw["extra"]["tcp_pose"][0].numpy(), atol=1e-4)
