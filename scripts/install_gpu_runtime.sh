#!/usr/bin/env bash
# GPU serving: replace onnxruntime with onnxruntime-gpu (the pin of the [gpu] extra in pyproject.toml).
# Both distributions install the same `onnxruntime` package, so side by side they overwrite each other's files,
# and pip cannot say "instead of": remove both, then install the GPU build alone. Run it again after any
# `pip install` of this project, which brings the CPU build back as a base dependency.
# Usage: bash scripts/install_gpu_runtime.sh [VENV]   (default: .venv; "" for the Python on PATH)
set -euo pipefail
venv=${1-.venv}
here=$(cd "$(dirname "$0")" && pwd)
py=${venv:+$venv/bin/}python
pin=$("$py" - "$here/../pyproject.toml" <<'PY'
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    print(*tomllib.load(f)["project"]["optional-dependencies"]["gpu"])
PY
)
"$py" -m pip uninstall -y -q onnxruntime onnxruntime-gpu 2>/dev/null || true
"$py" -m pip install -q "$pin"
"$py" -c 'import onnxruntime as ort; print(f"onnxruntime-gpu {ort.__version__}: {ort.get_available_providers()}")'
