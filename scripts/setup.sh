#!/usr/bin/env bash
# Create the virtual environment with the pinned stack, and a Vulkan renderer for SAPIEN.
set -euo pipefail
venv=${1:-.venv}
here=$(cd "$(dirname "$0")" && pwd)

bash "$here/install_vulkan.sh"

py=${PYTHON:-}
if [ -z "$py" ]; then
  for cand in python3.11 python3.12 python3; do  # requires-python: 3.11-3.12
    if command -v "$cand" >/dev/null 2>&1; then py=$cand; break; fi
  done
fi
if [ ! -x "$venv/bin/python" ]; then
  if ! "$py" -m venv "$venv" 2>/dev/null; then
    # Debian/Ubuntu system Pythons need the venv module from apt.
    apt-get install -y -qq python3-venv >/dev/null
    "$py" -m venv "$venv"
  fi
fi
"$venv/bin/python" -m pip install -q --upgrade pip
# torch is pinned exactly (2.13.0): a range would let pip pull a multi-GB CUDA build on CPU hosts.
# The base is the robot side; [train]: torch, ManiSkill, SAPIEN; [ros]: rclpy, Fast DDS, the message packages and
# colcon as PyPI wheels, for the ROS 2 nodes' tests and demo.
"$venv/bin/python" -m pip install -q -e ".[train,dev,ros]"
# A venv switched to GPU serving keeps it: the install above brought the CPU onnxruntime back beside it.
if "$venv/bin/python" -m pip show -q onnxruntime-gpu >/dev/null 2>&1; then
  bash "$here/install_gpu_runtime.sh" "$venv"
fi
# The ROS 2 nodes (ros2_ws/src/vla_ros) importable in the venv, as sourcing a colcon overlay would make them.
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$(cd "$here/.." && pwd)/ros2_ws/src/vla_ros" > "$site/vla_ros_src.pth"
echo "setup: done ($("$venv/bin/python" --version), torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)'))"
