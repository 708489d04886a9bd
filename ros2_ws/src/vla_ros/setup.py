"""ament_python package: `ros2 run vla_ros <node>` finds the console scripts in lib/vla_ros.

The nodes also import the project's Python packages (policy_runtime, sim_trainer, calibration): install the
repository (`pip install -e .` at its root) into the Python environment ROS 2 uses.
"""

from setuptools import find_packages, setup

PACKAGE = "vla_ros"
NODES = {
    "camera_node": "camera_node",
    "policy_node": "policy_node",
    "safety_filter": "safety_node",
    "eval_manager": "eval_manager_node",
    "teleop": "teleop_node",
    "sim_twin": "sim_twin_node",
    "scripted_operator": "operator_node",
    "calibration_capture": "capture_node",
}

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="vla-rl-stack",
    maintainer_email="vla-rl-stack@example.com",
    description="Flow VLA policy on a ROS 2 arm: nodes",
    license="Apache-2.0",
    entry_points={"console_scripts": [f"{exe} = {PACKAGE}.{mod}:main" for exe, mod in NODES.items()]
                  + [f"vla_ros_stack = {PACKAGE}.stack:main"]},
)
