"""ONNX export of the unrolled sampler: graph shape, manifest, parity with PyTorch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from policy_runtime.contract import graph_input_names as input_names
from sim_trainer.errors import UserError
from sim_trainer.export.onnx_export import export_onnx
from sim_trainer.models.checkpoint import file_sha256, load_checkpoint
from sim_trainer.models.tokenizer import tokenize


@pytest.fixture(scope="module")
def exported(tiny_rgb_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "k2"
    return export_onnx(tiny_rgb_checkpoint, out, num_steps=2)


def test_graph_is_unrolled_with_noise_as_an_input(exported):
    graph = onnx.load(str(exported.out / "policy.onnx"))
    ops = {n.op_type for n in graph.graph.node}
    assert not ops & {"Loop", "If", "Scan"}
    assert [i.name for i in graph.graph.input] == ["image.base_camera", "state", "text", "noise"]
    assert [o.name for o in graph.graph.output] == ["actions"]


def test_manifest_describes_the_contract(exported, tiny_rgb_checkpoint):
    m = json.loads((exported.out / "manifest.json").read_text())
    loaded = load_checkpoint(tiny_rgb_checkpoint)
    assert m["model_sha256"] == file_sha256(exported.out / "policy.onnx")
    assert (m["num_steps"], m["horizon"], m["action_dim"]) == (2, 8, loaded.spec.action_dim)
    assert m["cameras"] == [{"name": "base_camera", "input": "image.base_camera", "height": 32, "width": 32,
                             "dtype": "uint8", "layout": "HWC RGB"}]
    assert m["state"]["dim"] == loaded.spec.state_dim and m["control_hz"] == 20.0
    assert m["parity"]["max_abs_err"] <= 1e-4 and m["onnx"]["opset"] == 17
    assert m["text"]["tokens"] == tokenize(loaded.spec.instruction, 48).tolist()
    assert len(m["normalisation"]["sha256"]) == 64


def test_onnx_runtime_matches_pytorch_for_the_same_noise(exported, tiny_rgb_checkpoint):
    loaded = load_checkpoint(tiny_rgb_checkpoint)
    session = ort.InferenceSession(str(exported.out / "policy.onnx"), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(5)
    b = 2
    images = torch.randint(0, 256, (b, 32, 32, 3), generator=g, dtype=torch.uint8)
    state = torch.randn(b, loaded.spec.state_dim, generator=g)
    text = tokenize(loaded.spec.instruction, 48).expand(b, -1).contiguous()
    noise = torch.randn(b, 8, loaded.spec.action_dim, generator=g)
    with torch.no_grad():
        ref = loaded.model.sample_actions({"base_camera": images}, state, text, noise, 2).numpy()
    got = session.run(["actions"], dict(zip(input_names(["base_camera"]), [t.numpy() for t in
                                                                           (images, state, text, noise)], strict=True)))
    np.testing.assert_allclose(got[0], ref, atol=1e-4)


def test_bad_requests_are_user_errors(tiny_rgb_checkpoint, tmp_path):
    with pytest.raises(UserError, match="at least 1"):
        export_onnx(tiny_rgb_checkpoint, tmp_path / "x", num_steps=0)
    proc = subprocess.run([sys.executable, "-m", "sim_trainer.cli", "export", "--ckpt", str(tmp_path / "none"),
                           "--out", str(tmp_path / "y")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "does not exist" in proc.stderr


def test_exported_policy_runs_closed_loop_in_sim_through_onnx_runtime(exported, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sim_trainer.cli", "eval", "--export", str(exported.out),
                           "--episodes", "1", "--envs", "1", "--max-steps", "6", "--out", str(tmp_path / "ev")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert report["summary"]["episodes"] == 1 and report["checkpoint"] == str(exported.out)
    both = subprocess.run([sys.executable, "-m", "sim_trainer.cli", "eval", "--export", str(exported.out),
                           "--ckpt", str(exported.out)], capture_output=True, text=True, timeout=120)
    assert both.returncode == 2 and "exactly one of" in both.stderr


def _manifest_as(export, tmp_path, edit) -> object:
    """A copy of `export` whose manifest `edit` changed."""
    import shutil

    out = shutil.copytree(export, tmp_path / "edited")
    m = json.loads((out / "manifest.json").read_text())
    edit(m)
    (out / "manifest.json").write_text(json.dumps(m))
    return out


def test_the_manifest_carries_the_controller_the_robot_side_reads(exported, tiny_rgb_checkpoint):
    from policy_runtime.contract import ControllerSemantics, contract_from_manifest

    m = json.loads((exported.out / "manifest.json").read_text())
    spec = load_checkpoint(tiny_rgb_checkpoint).spec
    c = contract_from_manifest(m, "onnx", "cpu")
    assert c.controller == ControllerSemantics.of(spec)
    assert c.controller.action_joints == tuple(f"panda_joint{i}" for i in range(1, 8)) + ("gripper",)
    assert (c.controller.arm_delta, c.controller.gripper_range) == ((-0.1, 0.1), (-0.01, 0.04))
    assert c.policy_spec() == spec  # what the robot's recorder writes episodes with
    assert m["output"]["clipped"] is False and c.clip_actions  # the graph never clips; the server does


def test_an_old_version_1_manifest_still_loads(exported, tmp_path):
    """A v1 export (no scaling, no joint list, no contract_version) serves with the Panda controller it meant."""
    from policy_runtime.backends.onnx_backend import OnnxBackend, OnnxOptions
    from policy_runtime.contract import contract_from_manifest
    from policy_runtime.protocol import Contract

    def to_v1(m: dict) -> None:
        m["version"] = 1
        del m["contract_version"], m["action"]["arm_delta"], m["action"]["gripper_range"], m["action"]["joints"]

    old = _manifest_as(exported.out, tmp_path, to_v1)
    c = OnnxBackend(old, OnnxOptions(providers=("CPUExecutionProvider",), warmup_runs=0)).contract()
    new = json.loads((exported.out / "manifest.json").read_text())
    assert c.controller == contract_from_manifest(new, "onnx", "cpu").controller
    assert Contract.from_wire(c.to_wire()) == c  # and it reaches the robot side unchanged


def test_a_newer_manifest_version_is_one_line_naming_it(exported, tmp_path):
    from tests.bad_input import assert_user_error, run_cli

    newer = _manifest_as(exported.out, tmp_path, lambda m: m.update(version=99))
    line = assert_user_error(run_cli("policy-runtime", ["check", str(newer)]), "manifest version 99")
    assert "1..2" in line
