"""ManiSkill3 environments as the policy sees them: task registry, observation adapter, vector envs."""

from policy_runtime.contract import CameraSpec, PolicySpec
from sim_trainer.envs.spec import EnvConfig
from sim_trainer.envs.tasks import TASKS, TaskInfo, get_task

__all__ = ["CameraSpec", "EnvConfig", "PolicySpec", "TASKS", "TaskInfo", "get_task"]
