"""Real-robot evaluation: camera (OpenCV node or a vendor driver), policy, safety filter, eval manager, teleop.

    ros2 launch vla_bringup eval.launch.py runtime:=tcp://gpu-box:5555 dry_run:=false

The policy server runs on the GPU box (`policy-runtime serve EXPORT_DIR --bind tcp://0.0.0.0:5555`).
Parameters come from config/robot_eval.yaml (argument `params`); the arguments below override the values
that change between setups. With a vendor camera driver (e.g. realsense2_camera) leave use_camera_node
false and point camera_topic at its color topic. For the single-key operator console and keyboard teleop,
give them a terminal: console_prefix:='xterm -e' (the eval manager's services work without one).
The same nodes and YAML run in one process with `vla_ros_stack` (tests/test_ros_launch.py checks this).
"""

from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

from launch import LaunchDescription


def generate_launch_description():
    config = PathJoinSubstitution([FindPackageShare("vla_bringup"), "config"])
    params = LaunchConfiguration("params")
    controller = {"controller_type": LaunchConfiguration("controller_type"),
                  "controller_topic": LaunchConfiguration("controller_topic")}
    camera_topic = LaunchConfiguration("camera_topic")
    args = [
        DeclareLaunchArgument("params", default_value=PathJoinSubstitution([config, "robot_eval.yaml"]),
                              description="robot parameter YAML"),
        DeclareLaunchArgument("plan", default_value=PathJoinSubstitution([config, "trial_plan.yaml"]),
                              description="trial plan YAML"),
        DeclareLaunchArgument("runtime", default_value="tcp://127.0.0.1:5555", description="policy server"),
        DeclareLaunchArgument("controller_type", default_value="joint_trajectory",
                              description="joint_trajectory | forward_command"),
        DeclareLaunchArgument("controller_topic", default_value="/joint_trajectory_controller/joint_trajectory"),
        DeclareLaunchArgument("camera_topic", default_value="/camera/camera/color/image_raw"),
        DeclareLaunchArgument("use_camera_node", default_value="false",
                              description="true: OpenCV camera node; false: a vendor driver publishes camera_topic"),
        DeclareLaunchArgument("camera_device", default_value="/dev/video0"),
        DeclareLaunchArgument("camera_calibration", default_value="", description="camera_info YAML"),
        DeclareLaunchArgument("results_dir", default_value="vla_eval_results"),
        DeclareLaunchArgument("dry_run", default_value="true", description="false to let commands reach the arm"),
        DeclareLaunchArgument("console_prefix", default_value="", description="e.g. 'xterm -e' for a key console"),
        DeclareLaunchArgument("policy_prefix", default_value="",
                              description="e.g. 'nice -n -10' to give the control tick CPU priority (needs the right)"),
    ]
    nodes = [
        Node(package="vla_ros", executable="camera_node", name="camera", output="screen",
             condition=IfCondition(LaunchConfiguration("use_camera_node")),
             parameters=[params, {"device": LaunchConfiguration("camera_device"),
                                  "calibration": LaunchConfiguration("camera_calibration"),
                                  "image_topic": camera_topic}]),
        Node(package="vla_ros", executable="policy_node", name="policy_node", output="screen",
             prefix=LaunchConfiguration("policy_prefix"),
             parameters=[params, {"runtime_endpoint": LaunchConfiguration("runtime"),
                                  "camera_topics": [camera_topic]}]),
        Node(package="vla_ros", executable="safety_filter", name="safety_filter", output="screen",
             parameters=[params, controller, {"dry_run": LaunchConfiguration("dry_run")}]),
        Node(package="vla_ros", executable="eval_manager", name="eval_manager", output="screen",
             prefix=LaunchConfiguration("console_prefix"),
             parameters=[params, {"plan": LaunchConfiguration("plan"),
                                  "results_dir": LaunchConfiguration("results_dir")}]),
        Node(package="vla_ros", executable="teleop", name="teleop", output="screen",
             prefix=LaunchConfiguration("console_prefix"), parameters=[params]),
    ]
    return LaunchDescription(args + nodes)
