# Two commands a user needs: `make demo` and `make test`. Both set up everything first and are idempotent.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_ARGS ?=

.PHONY: setup demo demo-sim test lint gpu-runtime gpu-check clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh scripts/install_vulkan.sh scripts/install_gpu_runtime.sh
	bash scripts/setup.sh $(VENV)
	touch $(STAMP)

# The full stack: policy server on the shipped checkpoint's export, ROS 2 nodes, sim twin, scripted operator.
demo: setup
	$(PY) -m vla_ros.demo $(DEMO_ARGS)

# The no-ROS demo (train/evaluate in ManiSkill only).
demo-sim: setup
	$(PY) -m sim_trainer.cli demo $(DEMO_ARGS)

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check .

# GPU serving: onnxruntime-gpu in place of onnxruntime (the two must never be installed side by side).
gpu-runtime: setup
	bash scripts/install_gpu_runtime.sh $(VENV)

# The GPU acceptance check (docs/gpu.md). No setup step: a GPU box runs it with the Python that holds its torch.
# WHEELHOUSE=DIR (scripts/wheelhouse.sh) installs the missing packages offline into GPU_SITE first.
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_SITE ?= .gpu-site
GPU_CHECK_OUT ?= outputs/gpu_check
GPU_CHECK_ARGS ?=
WHEELHOUSE ?=
gpu-check:
ifneq ($(WHEELHOUSE),)
	PYTHON=$(GPU_PYTHON) bash scripts/wheelhouse.sh --install $(WHEELHOUSE) --target $(GPU_SITE)
endif
	PYTHONPATH=$(if $(WHEELHOUSE),$(abspath $(GPU_SITE)):)$(CURDIR) $(GPU_PYTHON) scripts/gpu_check.py \
		--out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

clean-venv:
	rm -rf $(VENV) .venv-robot
