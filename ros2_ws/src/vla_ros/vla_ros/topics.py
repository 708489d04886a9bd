"""Topic names and QoS profiles shared by the nodes, so a rename happens in one place."""

from __future__ import annotations

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

JOINT_STATES = "/joint_states"
POLICY_ACTION = "/vla/policy/action"        # sensor_msgs/JointState: normalised action, names = action dims
POLICY_STEP = "/vla/policy/step"            # std_msgs/Float64MultiArray: [step, stamp, state..., action...]
POLICY_OBS_IMAGE = "/vla/policy/obs_image"  # sensor_msgs/Image: the resized image the model saw
POLICY_CHUNK = "/vla/policy/chunk"          # trajectory_msgs/JointTrajectory: the normalised actions of the chunk
                                            # starting now, a point per control step (names = action dims)
POLICY_SPEC = "/vla/policy/spec"            # std_msgs/String (JSON hello contract), latched
TELEOP_COMMAND = "/vla/teleop/command"      # sensor_msgs/JointState: absolute joint targets by name
CONTROL_SOURCE = "/vla/control_source"      # std_msgs/String: policy | teleop | hold, latched
INSTRUCTION = "/vla/instruction"            # std_msgs/String, latched
EVAL_TRIAL = "/vla/eval/trial"              # std_msgs/String (JSON: index, seed, instruction), latched
EVAL_STATE = "/vla/eval/state"              # std_msgs/String (JSON: state, trial, counts), latched
ESTOP = "/vla/estop"                        # std_msgs/Bool: True latches the software e-stop
SIM_SUCCESS = "/sim_twin/success"           # std_msgs/Bool, every physics step
DIAGNOSTICS = "/diagnostics"                # diagnostic_msgs/DiagnosticArray

SOURCES = ("policy", "teleop", "hold")

# Cameras: best effort, newest frame only (a best-effort subscriber also receives from reliable publishers).
SENSOR_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT, history=HistoryPolicy.KEEP_LAST,
                        durability=DurabilityPolicy.VOLATILE)
# Commands and records: reliable, a short queue.
COMMAND_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
# Mode switches a late joiner must still see.
LATCHED_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
# The safety filter judges every control-source message by its sender, so its subscription keeps them all until
# taken: with the latched depth of 1, the eval manager's 5 Hz heartbeat can replace a foreign message before it is
# judged, and the intrusion goes unseen. History depth is not a matched policy: this reader matches every latched
# writer, and a late joiner still gets each writer's last word.
SOURCE_AUDIT_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_ALL,
                              durability=DurabilityPolicy.TRANSIENT_LOCAL)
