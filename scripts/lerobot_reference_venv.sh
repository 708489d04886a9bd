#!/usr/bin/env bash
# The LeRobot reference venv: the real `lerobot` package, for parity checks and golden fixtures only.
#
# LeRobot cannot share the project's environment (it needs numpy 2, torch < 2.11 and transformers 4.x; the project
# pins numpy 1.26 for ManiSkill's motion planner and torch 2.13), so it lives in its own venv, never used by
# `make test`. What it produces (tests/fixtures/*) is committed; the tests compare our code against those files.
#
#   bash scripts/lerobot_reference_venv.sh [VENV_DIR]      # default .venv-lerobot; needs network, about 7 GB
#
# lerobot is installed without its resolver pins (--no-deps), with the packages its policy and dataset modules
# import. torch/torchvision come from PyPI, where only CUDA builds exist (about 6 GB with their NVIDIA libraries;
# they run on a CPU): PyPI's torchvision does not load on the project's CPU torch wheel ("operator torchvision::nms
# does not exist"), and the PyTorch CPU index is not reachable from every host. lerobot asks for torch < 2.11; its
# policy and dataset modules run on 2.14.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-lerobot}
PY=${PYTHON:-python3.11}

if ! command -v "$PY" >/dev/null; then
  echo "error: $PY not found (set PYTHON=/path/to/python3.11)" >&2
  exit 2
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" torch==2.14.1 torchvision==0.29.1
"${PIP[@]}" --no-deps lerobot==0.4.4
"${PIP[@]}" numpy==2.2.6 transformers==4.57.6 huggingface-hub==0.35.3 diffusers==0.35.2 datasets==4.8.5 \
  "pyarrow>=21,<26" pandas accelerate draccus==0.10.0 einops deepdiff termcolor jsonlines imageio av pillow \
  pyserial safetensors sentencepiece "packaging" "gymnasium>=1.0" "jsonschema" "num2words" "rerun-sdk>=0.24,<0.27"
"$VENV/bin/python" - <<'EOF'
import lerobot, torch, numpy, transformers
from lerobot.policies.pi0 import modeling_pi0  # noqa: F401
from lerobot.policies.pi05 import modeling_pi05  # noqa: F401
from lerobot.policies.smolvla import modeling_smolvla  # noqa: F401
from lerobot.datasets.lerobot_dataset import LeRobotDataset  # noqa: F401
print(f"reference venv ready: lerobot {lerobot.__version__}, torch {torch.__version__}, numpy {numpy.__version__}, "
      f"transformers {transformers.__version__}")
EOF
