"""ament_python package installing the top-level launch/ folder (launch files + config YAMLs) into share/.

The files live in the repository's launch/ folder, so the one-process entry point, the tests and
`ros2 launch vla_bringup ...` all read the same ones; a symlink-free relative path keeps colcon happy.
"""

from glob import glob
from pathlib import Path

from setuptools import setup

PACKAGE = "vla_bringup"
HERE = Path(__file__).resolve().parent
LAUNCH = Path("..", "..", "..", "launch")  # relative to this file: colcon builds from the package directory


def files(pattern: str) -> list[str]:
    found = sorted(glob(str(LAUNCH / pattern)))
    if not found:
        raise SystemExit(f"vla_bringup: no files match {LAUNCH / pattern} (run from {HERE})")
    return found


setup(
    name=PACKAGE,
    version="0.1.0",
    packages=[],
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", files("*.launch.py")),
        (f"share/{PACKAGE}/config", files("config/*.yaml")),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="vla-rl-stack",
    maintainer_email="vla-rl-stack@example.com",
    description="Launch files and parameters for the flow VLA evaluation stack",
    license="Apache-2.0",
)
