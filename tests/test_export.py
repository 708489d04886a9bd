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
