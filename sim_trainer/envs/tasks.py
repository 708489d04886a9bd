"""The tasks we support: ManiSkill3 tabletop tasks that need no asset download, each with an instruction."""

from __future__ import annotations

from dataclasses import dataclass

from sim_trainer.errors import UserError


@dataclass(frozen=True)
class TaskInfo:
    env_id: str
    instruction: str
    # Policies imitating motion-planned demos move slower than RL experts, so evaluation gets a longer
    # horizon than ManiSkill's RL default of 50 steps (ManiSkill's own BC baselines do the same).
    max_episode_steps: int
    # ManiSkill's sensor cameras of the task: the names a camera config (--camera-config) may override.
    cameras: tuple[str, ...] = ("base_camera",)


TASKS: dict[str, TaskInfo] = {
    t.env_id: t
    for t in (
        TaskInfo("PickCube-v1", "pick up the red cube and move it to the goal", 100),
        TaskInfo("PushCube-v1", "push the cube to the red and white target", 100),
        TaskInfo("StackCube-v1", "stack the red cube on top of the green cube", 150),
        TaskInfo("PullCube-v1", "pull the cube back to the red and white target", 100),
    )
}

CONTROL_MODES = ("pd_joint_delta_pos", "pd_ee_delta_pose")
OBS_MODES = ("rgb", "state")


def get_task(env_id: str) -> TaskInfo:
    if env_id not in TASKS:
        raise UserError(f"unknown task {env_id!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[env_id]
