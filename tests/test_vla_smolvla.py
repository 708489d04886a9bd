"""SmolVLA: parity with LeRobot's reference on the committed fixture, the policy interface, and loader errors.

tests/fixtures/smolvla was written by scripts/make_smolvla_fixture.py in the LeRobot reference venv: a tiny random
SmolVLA saved in LeRobot's format, with the reference's outputs on fixed inputs, noise and flow times.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sim_trainer.errors import UserError
from sim_trainer.models.vla.smolvla import load_smolvla, vision_positions

FIXTURE = Path(__file__).parent / "fixtures" / "smolvla"
POLICY = FIXTURE / "policy"
TOL = 1e-4
WEIGHTS = "model.safetensors"


# smolvla_base's layout, then the other layouts LeRobot runs: an expert with half the layers, self-attention only
LAYOUTS = {"default": FIXTURE, "half_expert": FIXTURE / "variants" / "half_expert",
           "self_attn": FIXTURE / "variants" / "self_attn"}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def case(request) -> tuple:
    """(model, reference tensors, metadata, inputs) of one layout's fixture."""
    d = LAYOUTS[request.param]
    model = load_smolvla(d / "policy")
    ref = load_file(str(d / "reference.safetensors"))
    meta = json.loads((d / "reference.json").read_text())
    images = {c: ref[f"image.{c}"] for c in meta["cameras"]}
    return model, ref, meta, (images, ref["state"], model.tokenize(meta["instructions"]))


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / "reference.safetensors"))


@pytest.fixture(scope="module")
def meta() -> dict:
    return json.loads((FIXTURE / "reference.json").read_text())


@pytest.fixture(scope="module")
def model():
    return load_smolvla(POLICY)


@pytest.fixture(scope="module")
def inputs(ref, meta, model):
    images = {c: ref[f"image.{c}"] for c in meta["cameras"]}
    return images, ref["state"], model.tokenize(meta["instructions"])


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ----- parity with the reference -------------------------------------------------------------------------------
def test_tokens_match_lerobot_preprocessor(case):
    """Same ids as LeRobot's preprocessor (newline appended, truncated); ours pads to max_text_len, which changes
    nothing downstream (padding is invisible and does not advance positions)."""
    model, ref, meta, _ = case
    tokens = model.tokenize(meta["instructions"])
    n = ref["tokens"].shape[1]
    assert tokens.shape == (2, model.cfg.max_text_len)
    assert torch.equal(tokens[:, :n], ref["tokens"])
    assert torch.equal(tokens[:, :n] != model.pad_id, ref["token_mask"])
    assert (tokens[:, n:] == model.pad_id).all()


def test_velocity_matches_reference_at_several_tau(case):
    model, ref, _, inputs = case
    with torch.no_grad():
        cache = model.encode_prefix(*inputs)
        for i, tau in enumerate(ref["tau"].tolist()):
            v = model.velocity(cache, ref["x"], torch.full((2,), tau))
            assert _max_err(v, ref["velocity"][i]) <= TOL, f"tau={tau}"


def test_sampled_chunk_matches_reference(case):
    model, ref, meta, inputs = case
    with torch.no_grad():
        chunk = model.sample_actions(*inputs, noise=ref["noise"])
        normalised = model.denoise(model.encode_prefix(*inputs), ref["noise"], meta["num_steps"])
    assert chunk.shape == ref["chunk"].shape == (2, model.cfg.horizon, model.cfg.action_dim)
    assert _max_err(normalised[..., : model.cfg.action_dim], ref["chunk_normalised"]) <= TOL
    assert _max_err(chunk, ref["chunk"]) <= TOL * ref["chunk"].abs().max().item()


def test_training_loss_matches_reference(case):
    model, ref, _, inputs = case
    with torch.no_grad():
        loss = model.flow_matching_loss(*inputs, ref["actions"], noise=ref["train_noise"], tau=ref["train_tau"])
    assert abs(loss.item() - ref["train_loss"].item()) <= TOL * max(1.0, ref["train_loss"].item())


def test_vision_positions_are_those_the_checkpoints_were_trained_with():
    """transformers 4.x buckets patch coordinates just below each edge, so rows 0 and 1 share an index; transformers
    5's own SmolVLM embedding gives 0, 1, 2, 3 and misses the reference by ~1e-2 on the fixture."""
    assert vision_positions(4, 4, 4, torch.device("cpu")).view(4, 4)[:, 0].tolist() == [0, 0, 4, 8]
    assert vision_positions(4, 4, 4, torch.device("cpu")).view(4, 4)[0].tolist() == [0, 0, 1, 2]


# ----- the policy interface ------------------------------------------------------------------------------------
def test_cache_is_read_only_across_denoising(model, ref, inputs):
    """The reference trims its shared cache during denoising; ours is never written, so log-prob recomputation
    can reuse it: the same velocity twice, and every cached tensor unchanged after a full K-step denoise."""
    with torch.no_grad():
        cache = model.encode_prefix(*inputs)
        before = [(k.clone(), v.clone()) for k, v in cache.kv]
        v1 = model.velocity(cache, ref["x"], torch.full((2,), 0.5))
        model.denoise(cache, ref["noise"], 10)
        v2 = model.velocity(cache, ref["x"], torch.full((2,), 0.5))
    assert torch.equal(v1, v2)
    assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(cache.kv, before, strict=True))


def test_expert_forward_on_robot_action_dims(model, ref, inputs):
    """x with only the robot's A dims is zero-padded inside: v has A dims and equals the padded call's first A."""
    a = model.cfg.action_dim
    with torch.no_grad():
        cache = model.encode_prefix(*inputs)
        tau = torch.full((2,), 0.6)
        v, feats = model.expert_forward(cache, ref["x"][..., :a], tau)
        padded = torch.cat([ref["x"][..., :a], torch.zeros_like(ref["x"][..., a:])], -1)
        v_full = model.velocity(cache, padded, tau)
    assert v.shape == (2, model.cfg.horizon, a)
    assert feats.shape == (2, model.cfg.horizon, model.feature_dim)
    assert cache.pooled.shape == (2, model.pooled_dim)
    assert torch.allclose(v, v_full[..., :a], atol=1e-6)


def test_parameter_groups_cover_every_parameter_once(model):
    groups = model.parameter_groups()
    assert set(groups) == {"vision", "language", "expert", "heads"}
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_gradient_checkpointing_gives_the_same_gradients(ref, inputs):
    model = load_smolvla(POLICY).train()
    grads = []
    for on in (False, True):
        model.gradient_checkpointing = on
        model.zero_grad()
        model.flow_matching_loss(*inputs, ref["actions"], noise=ref["train_noise"], tau=ref["train_tau"]).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))


def test_bf16_autocast_samples_finite_actions(model, ref, inputs):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        chunk = model.sample_actions(*inputs, noise=ref["noise"], num_steps=2)
    assert chunk.shape == ref["chunk"].shape and torch.isfinite(chunk).all()


def test_bf16_weights_stay_close_and_keep_float32_statistics(ref, inputs):
    model = load_smolvla(POLICY).to(torch.bfloat16)
    assert model.state_norm.mean.dtype == model.action_norm.std.dtype == torch.float32
    with torch.no_grad():
        chunk = model.sample_actions(*inputs, noise=ref["noise"])
    assert chunk.dtype == torch.float32
    assert _max_err(chunk, ref["chunk"]) <= 0.05 * ref["chunk"].abs().max().item()


def test_a_missing_camera_is_dropped_and_with_none_the_prefix_is_text_and_state(model, ref, inputs):
    """A policy fitted to state-only data runs on its instruction and state (as pi0 / pi0.5 do)."""
    images, state, text = inputs
    with torch.no_grad():
        chunk = model.sample_actions({"wrist": images["wrist"]}, state, text, noise=ref["noise"], num_steps=2)
        cache = model.encode_prefix({}, state, text)
        blind = model.sample_actions({}, state, text, noise=ref["noise"], num_steps=2)
    assert torch.isfinite(chunk).all() and torch.isfinite(blind).all()
    assert cache.mask.shape[1] == text.shape[1] + 1 and torch.equal(cache.mask[:, :-1], text != model.pad_id)


def test_legacy_normaliser_buffers_in_the_weights_file(tmp_path, model):
    """Checkpoints saved before LeRobot's processor pipeline kept the stats inside model.safetensors."""
    d = _copy(tmp_path)
    stats = {**load_file(str(d / "policy_preprocessor_step_5_normalizer_processor.safetensors"))}
    for name in ("policy_preprocessor.json", "policy_postprocessor.json"):
        (d / name).unlink()
    weights = load_file(str(d / WEIGHTS))
    weights.update({f"normalize_inputs.buffer_observation_state.{s}": stats[f"observation.state.{s}"]
                    for s in ("mean", "std")})
    weights.update({f"unnormalize_outputs.buffer_action.{s}": stats[f"action.{s}"] for s in ("mean", "std")})
    save_file(weights, str(d / WEIGHTS))
    loaded = load_smolvla(d)
    assert torch.equal(loaded.state_norm.mean, model.state_norm.mean)
    assert torch.equal(loaded.action_norm.std, model.action_norm.std)


# ----- clear errors ----------------------------------------------------------------------------------------------
def _copy(tmp_path: Path) -> Path:
    d = tmp_path / "policy"
    shutil.copytree(POLICY, d)
    return d


def _error(directory: Path) -> str:
    with pytest.raises(UserError) as e:
        load_smolvla(directory)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_every_bad_key_is_named(tmp_path):
    d = _copy(tmp_path)
    w = load_file(str(d / WEIGHTS))
    del w["model.vlm_with_expert.lm_expert.layers.1.mlp.up_proj.weight"]
    w["model.vlm_with_expert.lm_expert.layers.1.mlp.extra.weight"] = torch.zeros(2)
    w["model.action_out_proj.weight"] = torch.zeros(3, 3)
    save_file(w, str(d / WEIGHTS))
    msg = _error(d)
    assert "missing: model.vlm_with_expert.lm_expert.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected: model.vlm_with_expert.lm_expert.layers.1.mlp.extra.weight" in msg
    assert "wrong shape: model.action_out_proj.weight (file [3, 3], model [8, 24])" in msg


def test_truncated_weights_file(tmp_path):
    d = _copy(tmp_path)
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[: len(data) // 2])
    assert f"{d / WEIGHTS} is not a readable safetensors file" in _error(d)


def test_missing_tokenizer(tmp_path):
    d = _copy(tmp_path)
    (d / "tokenizer.json").unlink()
    (d / "smolvlm" / "tokenizer.json").unlink()
    assert "no tokenizer.json" in _error(d)


def test_tokenizer_of_another_model(tmp_path):
    from tokenizers import Tokenizer, models

    d = _copy(tmp_path)
    Tokenizer(models.WordLevel({f"w{i}": i for i in range(400)} | {"<|im_end|>": 400}, unk_token="w0")).save(
        str(d / "tokenizer.json"))
    assert "tokenizer has 401 tokens but the backbone's embedding has 300" in _error(d)


def test_missing_normaliser_stats(tmp_path):
    d = _copy(tmp_path)
    (d / "policy_preprocessor_step_5_normalizer_processor.safetensors").unlink()
    assert "policy_preprocessor_step_5_normalizer_processor.safetensors is missing" in _error(d)


@pytest.mark.parametrize(("change", "expected"), [
    ({"type": "pi0"}, "type is 'pi0', not 'smolvla'"),
    ({"num_vlm_layers": 7}, "num_vlm_layers 7 is not within the backbone's 6 layers"),
    ({"num_expert_layers": 3}, "num_vlm_layers 4 is not a multiple of num_expert_layers 3"),
    ({"add_image_special_tokens": True}, "add_image_special_tokens=true is not supported"),
    ({"num_expert_layers": 2}, "pair a cross-attention expert layer with a self-attention VLM layer"),
    ({"output_features": {}}, "needs the feature 'action'"),
    ({"input_features": {"observation.state": {"type": "STATE", "shape": [6]},
                         "observation.images.top": {"type": "VISUAL", "shape": [3, 24, 40]}}},
     "normaliser observation.state statistics have shapes [5]/[5] but config.json gives observation.state 6 dims"),
    ({"vlm_model_name": "no/such/backbone"}, "cannot find the SmolVLM backbone 'no/such/backbone'"),
])
def test_bad_config(tmp_path, change, expected):
    d = _copy(tmp_path)
    raw = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(raw | change))
    assert expected in _error(d)


def test_not_a_directory(tmp_path):
    assert "is not a directory" in _error(tmp_path / "nothing")
