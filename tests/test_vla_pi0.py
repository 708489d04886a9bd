"""pi0 / pi0.5 against LeRobot's reference (fixtures from scripts/make_pi_fixtures.py), loading and the interface.

The fixtures are tiny random policies saved by LeRobot 0.4.4 itself, with its outputs for fixed inputs, noise
and flow times. Our loader reads the same directory; the velocities, the K=10 chunk and the loss must agree to
1e-4.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sim_trainer.errors import UserError
from sim_trainer.models.vla import Pi0, Pi05, load_vla
from sim_trainer.models.vla.common import StatsNormalizer
from sim_trainer.models.vla.loader import key_problems, paligemma_config, paligemma_weights

FIXTURES = Path(__file__).parent / "fixtures"
KINDS = ("pi0", "pi05")
TOL = 1e-4
TASKS = ["pick up the red cube and put it in the bowl", "open_the drawer"]  # the fixtures' instructions


def reference(kind: str) -> tuple[dict, dict]:
    d = FIXTURES / kind
    return load_file(str(d / "reference.safetensors")), json.loads((d / "reference.json").read_text())


def inputs(ref: dict) -> tuple[dict, torch.Tensor]:
    images = {k.removeprefix("image."): v for k, v in ref.items() if k.startswith("image.")}
    return images, ref["state"]


@pytest.fixture(scope="module", params=KINDS)
def loaded(request):
    kind = request.param
    torch.manual_seed(0)
    return kind, load_vla(FIXTURES / kind), *reference(kind)


def test_loads_as_the_right_class(loaded):
    kind, model, _, _ = loaded
    assert isinstance(model, {"pi0": Pi0, "pi05": Pi05}[kind])
    assert model.cfg.camera_names == ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
    assert (model.cfg.state_dim, model.cfg.action_dim, model.cfg.horizon) == (8, 7, 4)


def test_tokenize_matches_the_reference_prompt(loaded):
    """The prefix's ids (pi0.5: the instruction's ids completed by the state table inside the model) are the
    reference's prompt ids once the padding is dropped."""
    _, model, ref, meta = loaded
    ids, valid = model.prompt_tokens(model.tokenize(meta["tasks"]), ref["state"])
    for row, ok, want, want_ok in zip(ids, valid, ref["tokens"], ref["token_mask"], strict=True):
        assert row[ok].tolist() == want[want_ok].tolist()


def test_pi05_state_part_of_the_prompt_is_built_from_the_state_tensor(loaded):
    kind, model, ref, meta = loaded
    if kind != "pi05":
        pytest.skip("pi0 has no state in its prompt")
    text = model.tokenize(meta["tasks"])
    assert torch.equal(text, model.tokenize(meta["tasks"]))  # no state: the robot tokenises once
    for state in (ref["state"], ref["state"] * 3 - 1):
        ids, valid = model.prompt_tokens(text, state)
        full = model.tokenizer.encode_batch(model.full_prompt(meta["tasks"], state))
        for row, ok, want in zip(ids, valid, full, strict=True):
            assert row[ok].tolist() == [i for i, m in zip(want.ids, want.attention_mask, strict=True) if m]


def test_velocity_matches_the_reference(loaded):
    _, model, ref, _ = loaded
    images, state = inputs(ref)
    text = model.tokenize(TASKS)
    noise = ref["noise"]
    actions = torch.nn.functional.pad(model.action_norm(ref["actions"]), (0, noise.shape[-1] - 7))
    with torch.no_grad():
        cache = model.encode_prefix(images, state, text)
        for tau, v_ref in zip(ref["taus"].tolist(), ref["velocities"], strict=True):
            x = tau * noise + (1 - tau) * actions
            v, feats = model.expert_forward(cache, x, torch.full((2,), tau))
            assert (v - v_ref).abs().max() <= TOL, f"tau={tau}: {(v - v_ref).abs().max():.2e}"
            assert feats.shape == (2, 4, model.feature_dim)


def test_sampled_chunk_and_loss_match_the_reference(loaded):
    _, model, ref, meta = loaded
    images, state = inputs(ref)
    text = model.tokenize(TASKS)
    with torch.no_grad():
        cache = model.encode_prefix(images, state, text)
        chunk = model.denoise(cache, ref["noise"], meta["num_steps"])
        raw = model.sample_actions(images, state, text, ref["noise"], num_steps=meta["num_steps"])
        loss = model.flow_matching_loss(images, state, text, ref["actions"], noise=ref["noise"],
                                        tau=ref["loss_tau"])
    assert (chunk - ref["chunk_normalised"]).abs().max() <= TOL
    assert (raw - ref["chunk_raw"]).abs().max() <= TOL
    assert abs(loss.item() - ref["loss"].item()) <= TOL


def test_every_interface_method_on_the_tiny_config(loaded):
    _, model, ref, meta = loaded
    images, state = inputs(ref)
    cfg = model.cfg
    for name in ("horizon", "action_dim", "state_dim", "num_steps", "exec_steps", "camera_names", "image_size",
                 "max_text_len"):
        assert getattr(cfg, name) is not None
    text = model.tokenize(meta["tasks"])
    cache = model.encode_prefix(images, state, text)
    assert cache.pooled.shape == (2, model.pooled_dim) and cache.mask.dtype == torch.bool
    x, tau = torch.randn(2, cfg.horizon, cfg.action_dim), torch.rand(2)
    v, feats = model.expert_forward(cache, x, tau)
    assert v.shape == x.shape and feats.shape == (2, cfg.horizon, model.feature_dim)
    assert torch.equal(model.velocity(cache, x, tau), v)
    assert model.denoise(cache, x, 2).shape == x.shape
    assert model.sample_actions(images, state, text, x).shape == (2, cfg.horizon, cfg.action_dim)
    assert torch.allclose(model.action_norm.inverse(model.action_norm(ref["actions"])), ref["actions"], atol=1e-5)
    assert model.state_norm(state).shape == state.shape
    groups = model.parameter_groups()
    assert set(groups) == {"vision", "language", "expert", "heads"}
    assert sum(len(g) for g in groups.values()) == len(list(model.parameters()))
    model.train()
    loss = model.flow_matching_loss(images, state, text, ref["actions"], generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is not None for p in groups["expert"])
    model.zero_grad(set_to_none=True)
    model.eval()


def test_images_of_another_size_are_resized_with_padding(loaded):
    _, model, ref, _ = loaded
    images, state = inputs(ref)
    text = model.tokenize(TASKS)
    double = {k: v.repeat_interleave(2, 1).repeat_interleave(2, 2) for k, v in images.items()}  # 64 x 64
    wide = {k: torch.nn.functional.pad(v, (0, 0, 8, 8)) for k, v in images.items()}  # 32 x 48
    with torch.no_grad():
        same = model.encode_prefix(images, state, text).pooled
        # a 2x upsampled image halves back exactly (bilinear, half-pixel centres)
        assert torch.allclose(model.encode_prefix(double, state, text).pooled, same, atol=1e-6)
        padded = model.encode_prefix(wide, state, text).pooled
    assert torch.isfinite(padded).all() and not torch.allclose(padded, same)


def test_gradient_checkpointing_gives_the_same_gradients(loaded):
    _, model, ref, _ = loaded
    images, state = inputs(ref)
    text = model.tokenize(TASKS)

    def grads(flag: bool) -> list[torch.Tensor]:
        model.cfg.gradient_checkpointing = flag
        model.train()
        model.zero_grad(set_to_none=True)
        model.flow_matching_loss(images, state, text, ref["actions"], noise=ref["noise"],
                                 tau=ref["loss_tau"]).backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    try:
        plain, ckpt = grads(False), grads(True)
    finally:
        model.cfg.gradient_checkpointing = False
        model.zero_grad(set_to_none=True)
        model.eval()
    assert len(plain) == len(ckpt) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, ckpt, strict=True))


# ----- bad checkpoints: one clear line naming what is wrong --------------------------------------------------
def copy_fixture(tmp_path: Path, kind: str = "pi0") -> Path:
    d = tmp_path / kind
    shutil.copytree(FIXTURES / kind, d)
    return d


def edit_weights(d: Path, edit) -> None:
    w = load_file(str(d / "model.safetensors"))
    edit(w)
    save_file(w, str(d / "model.safetensors"))


def assert_one_line(err: pytest.ExceptionInfo, *fragments: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, msg


def test_missing_unexpected_and_wrong_shape_keys_are_all_named(tmp_path):
    d = copy_fixture(tmp_path)
    q = "model.paligemma_with_expert.gemma_expert.model.layers.1.self_attn.q_proj.weight"

    def edit(w):
        del w["model.state_proj.weight"]
        w["model.extra_head.weight"] = torch.zeros(2)
        w[q] = torch.zeros(3, 3)

    edit_weights(d, edit)
    with pytest.raises(UserError) as err:
        load_vla(d)
    assert_one_line(err, "missing keys: state_proj.weight", "unexpected keys: extra_head.weight",
                    "expert.layers.1.self_attn.q_proj.weight (3, 3)")


def test_pi05_weights_under_a_pi0_config_name_the_mismatch(tmp_path):
    d = copy_fixture(tmp_path, "pi05")
    cfg = json.loads((d / "config.json").read_text())
    cfg["type"] = "pi0"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError) as err:
        load_vla(d)
    assert_one_line(err, "missing keys", "state_proj.weight", "expert.layers.0.input_layernorm.weight",
                    "unexpected keys", "input_layernorm.dense.weight")


@pytest.mark.parametrize("breakage, fragment", [
    (lambda d: (d / "model.safetensors").write_bytes(b"\x00garbage"), "not a readable safetensors file"),
    (lambda d: (d / "config.json").unlink(), "config.json is missing"),
    (lambda d: (d / "config.json").write_text("{not json"), "cannot read"),
    (lambda d: (d / "tokenizer.json").unlink(), "no tokenizer.json"),
    (lambda d: (d / "tokenizer.json").write_text("{}"), "cannot read tokenizer"),
    (lambda d: (d / "policy_preprocessor_step_5_normalizer_processor.safetensors").unlink(),
     "cannot read normaliser statistics"),
])
def test_broken_directories_give_one_clear_line(tmp_path, breakage, fragment):
    d = copy_fixture(tmp_path)
    breakage(d)
    with pytest.raises(UserError) as err:
        load_vla(d)
    assert_one_line(err, fragment)


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    d = copy_fixture(tmp_path)
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["model"]["vocab"].update({f"tok{i}": 200 + i for i in range(10)})
    (d / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(UserError) as err:
        load_vla(d)
    assert_one_line(err, "not this model's tokenizer")


def test_unknown_type_and_offline_repo_id(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    d = copy_fixture(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["type"] = "act"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError) as err:
        load_vla(d)
    assert_one_line(err, "policy type 'act' is not supported")
    with pytest.raises(UserError) as err:
        load_vla("no-such-owner-xyz/no-such-policy")
    assert_one_line(err, "cannot fetch no-such-owner-xyz/no-such-policy")


def test_bf16_autocast_samples_close_to_fp32(loaded):
    _, model, ref, meta = loaded
    images, state = inputs(ref)
    text = model.tokenize(TASKS)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        raw = model.sample_actions(images, state, text, ref["noise"], num_steps=meta["num_steps"])
    assert raw.dtype == torch.float32 and torch.isfinite(raw).all()
    scale = ref["chunk_raw"].abs().max()
    assert (raw - ref["chunk_raw"]).abs().max() <= 0.1 * scale


def test_pi05_state_prompt_of_the_robot_dims_only(loaded):
    kind, model, ref, meta = loaded
    if kind != "pi05":
        pytest.skip("pi0 has no state in its prompt")
    model.cfg.extra["state_prompt_dims"] = "robot"
    try:
        prompt = model.full_prompt(meta["tasks"][:1], ref["state"][:1])[0]
    finally:
        model.cfg.extra["state_prompt_dims"] = "padded"
    assert len(prompt.split("State: ")[1].split(";")[0].split()) == model.cfg.state_dim
    assert prompt.startswith("Task: pick up the red cube and put it in the bowl, State: ")


def test_lora_on_the_language_model_trains_only_the_adapters():
    model = load_vla(FIXTURES / "pi0")
    ref, _ = reference("pi0")
    images, state = inputs(ref)
    text = model.tokenize(TASKS)
    with torch.no_grad():
        before = model.sample_actions(images, state, text, ref["noise"], num_steps=2)
    model.enable_lora(rank=4)
    groups = model.parameter_groups()
    assert groups["lora"] and all(p.requires_grad for p in groups["lora"])
    assert not any(p.requires_grad for p in groups["language"])
    lm_before = [p.detach().clone() for p in groups["language"]]
    with torch.no_grad():  # B starts at zero: nothing changes until the adapters train
        assert torch.allclose(model.sample_actions(images, state, text, ref["noise"], num_steps=2), before)
    opt = torch.optim.SGD(groups["lora"], lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        model.flow_matching_loss(images, state, text, ref["actions"], noise=ref["noise"],
                                 tau=ref["loss_tau"]).backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(lm_before, groups["language"], strict=True))
    with torch.no_grad():
        after = model.sample_actions(images, state, text, ref["noise"], num_steps=2)
    assert not torch.allclose(after, before)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_weights_sample_close_to_fp32(kind):
    model = load_vla(FIXTURES / kind).to(torch.bfloat16)
    ref, meta = reference(kind)
    images, state = inputs(ref)
    with torch.no_grad():
        raw = model.sample_actions(images, state, model.tokenize(meta["tasks"]), ref["noise"])
    assert raw.dtype == torch.float32 and torch.isfinite(raw).all()
    assert (raw - ref["chunk_raw"]).abs().max() <= 0.05 * ref["chunk_raw"].abs().max()


@pytest.mark.parametrize("kind", KINDS)
def test_the_full_size_checkpoint_layout_fits_our_model(kind):
    """Every key and shape of the real-size policy as LeRobot saves it maps onto our full-size model (built on
    the meta device: no memory), with the published sizes (PaliGemma 3B: Gemma 2B + SigLIP So400m; 300M expert)."""
    layout = json.loads((FIXTURES / kind / "full_size_layout.json").read_text())
    cls = {"pi0": Pi0, "pi05": Pi05}[kind]
    ours = paligemma_weights({k: torch.empty(s, device="meta") for k, s in layout.items()}, cls.checkpoint_renames)
    config = json.loads((FIXTURES / kind / "config.json").read_text())
    config["image_resolution"] = [224, 224]
    cfg = paligemma_config(ours, config, Path("config.json"))
    assert (cfg.lm.width, cfg.lm.depth, cfg.lm.mlp_dim, cfg.lm.num_heads, cfg.lm.head_dim, cfg.lm.vocab_size) == (
        2048, 18, 16384, 8, 256, 257152)
    assert (cfg.expert.width, cfg.expert.mlp_dim) == (1024, 4096)
    assert (cfg.vision.width, cfg.vision.depth, cfg.vision.num_heads, cfg.vision.image_size) == (1152, 27, 16, 224)
    identity = StatsNormalizer("identity", {})
    with torch.device("meta"):
        model = cls(cfg, identity, identity)
    assert key_problems(model, ours) == []
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    assert 3.2 < billions < 3.4


def test_pi05_with_a_tokenizer_the_state_table_does_not_fit_retokenises_the_whole_prompt(tmp_path):
    """A tokenizer that merges ": " (across the boundary before the first number): the table would give other ids
    than LeRobot's prompt, so the model tokenises the whole prompt on the host."""
    d = tmp_path / "pi05"
    shutil.copytree(FIXTURES / "pi05", d)
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["model"]["vocab"][": "] = 100
    tok["model"]["merges"] = [[":", " "]]
    tok["decoder"] = {"type": "Fuse"}  # decoding gives the text back (the real tokenizers' decoders do)
    (d / "tokenizer.json").write_text(json.dumps(tok))
    model = load_vla(d)
    ref, meta = reference("pi05")
    assert not model.state_table_exact
    ids, valid = model.prompt_tokens(model.tokenize(meta["tasks"]), ref["state"])
    whole = model.tokenizer.encode_batch(model.full_prompt(meta["tasks"], ref["state"]))
    for row, ok, want in zip(ids, valid, whole, strict=True):
        assert row[ok].tolist() == [i for i, m in zip(want.ids, want.attention_mask, strict=True) if m]
    assert 100 in ids[0].tolist()  # the merged token is there, as in the whole prompt's ids
