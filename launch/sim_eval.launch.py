"""Sim-twin evaluation: the ManiSkill twin instead of the arm and camera, with the same nodes as eval.launch.py.

    ros2 launch vla_bringup sim_eval.launch.py runtime:=tcp://127.0.0.1:5555 scripted_operator:=true

Parameters come from config/sim_eval.yaml; the twin publishes /clock and the other nodes use sim time.
With scripted_operator the scene resets and trial starts are automatic (what `make demo` does).
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
    args = [
        DeclareLaunchArgument("params", default_value=PathJoinSubstitution([config, "sim_eval.yaml"])),
        DeclareLaunchArgument("plan", default_value=PathJoinSubstitution([config, "sim_trial_plan.yaml"])),
        DeclareLaunchArgument("runtime", default_value="tcp://127.0.0.1:5555"),
        DeclareLaunchArgument("results_dir", default_value="vla_sim_eval_results"),
        DeclareLaunchArgument("scripted_operator", default_value="false"),
        DeclareLaunchArgument("console_prefix", default_value=""),
    ]
    nodes = [
        Node(package="vla_ros", executable="sim_twin", name="sim_twin", output="screen", parameters=[params]),
        Node(package="vla_ros", executable="policy_node", name="policy_node", output="screen",
             parameters=[params, {"runtime_endpoint": LaunchConfiguration("runtime")}]),
        Node(package="vla_ros", executable="safety_filter", name="safety_filter", output="screen",
             parameters=[params]),
        Node(package="vla_ros", executable="eval_manager", name="eval_manager", output="screen",
             prefix=LaunchConfiguration("console_prefix"),
             parameters=[params, {"plan": LaunchConfiguration("plan"),
                                  "results_dir": LaunchConfiguration("results_dir")}]),
        Node(package="vla_ros", executable="teleop", name="teleop", output="screen",
             prefix=LaunchConfiguration("console_prefix"), parameters=[params]),
        Node(package="vla_ros", executable="scripted_operator", name="scripted_operator", output="screen",
             condition=IfCondition(LaunchConfiguration("scripted_operator")), parameters=[params]),
    ]
    return LaunchDescription(args + nodes)
