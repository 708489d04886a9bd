"""openpi's PyTorch checkpoints: the committed LeRobot fixtures rewritten in openpi's layout (no `model.` prefix,
no token embedding beside lm_head, openpi's config.json, assets/<asset_id>/norm_stats.json) load as the same
policies and match LeRobot's reference outputs; bad checkpoints and ambiguous asset choices are one line.

The only computation that differs from the LeRobot directory is the normaliser's eps (openpi: std + 1e-6 and
q99 - q01 + 1e-6, in both directions; LeRobot: std + 1e-8 on the way in only, no eps on a nonzero quantile
span), so the reference tolerance TOL also bounds the openpi checkpoint, and the test measures the eps's share.
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
from tests.bad_input import assert_refused_unchanged, run_cli

FIXTURES = Path(__file__).parent / "fixtures"
KINDS = ("pi0", "pi05")
TOL = 1e-4  # the LeRobot parity tolerance (tests/test_vla_pi0.py)
EPS_TOL = 1e-5  # what the eps difference may move a normalised input or a raw action by, on these statistics
TASKS = ["pick up the red cube and put it in the bowl", "open_the drawer"]
# openpi keeps these in fp32 when it casts a model to bf16
FP32_KEEP = ("patch_embedding", "position_embedding", "input_layernorm", "post_attention_layernorm", "model.norm")
DATASET = FIXTURES / "lerobot_written" / "dataset"  # 3 state dims, 2 action dims, one 12 x 12 camera


def lerobot_stats(kind: str) -> dict[str, dict[str, list[float]]]:
    """The fixture's processor statistics as openpi's norm_stats.json entries (state, actions)."""
    stats = {}
    for f in sorted((FIXTURES / kind).glob("policy_preprocessor_*normalizer_processor.safetensors")):
        stats.update(load_file(str(f)))
    return {ours: {k: stats[f"{theirs}.{k}"].tolist() for k in ("mean", "std", "q01", "q99")}
            for ours, theirs in (("state", "observation.state"), ("actions", "action"))}


def write_stats(directory: Path, asset_id: str, stats: dict) -> None:
    (directory / asset_id).mkdir(parents=True, exist_ok=True)
    (directory / asset_id / "norm_stats.json").write_text(json.dumps({"norm_stats": stats}))


def to_openpi(kind: str, dst: Path, bf16: bool = False, assets: tuple[str, ...] = ("robot",),
              **config) -> Path:
    """The fixture in openpi's layout. The reference's prompt length (pi0: 24) and LeRobot 0.4's padded state
    prompt (pi0.5) are written as config fields, since openpi's defaults differ (48 / 200 tokens, the robot's
    state dims)."""
    dst.mkdir(parents=True)
    weights = {k.removeprefix("model."): v for k, v in load_file(str(FIXTURES / kind / "model.safetensors")).items()}
    if bf16:
        weights = {k: v if any(s in k for s in FP32_KEEP) else v.to(torch.bfloat16) for k, v in weights.items()}
    save_file(weights, str(dst / "model.safetensors"))
    fields = {"action_dim": 32, "action_horizon": 4, "paligemma_variant": "gemma_2b",
              "action_expert_variant": "gemma_300m", "precision": "bfloat16" if bf16 else "float32"}
    fields.update({"max_token_len": 24} if kind == "pi0" else {"state_prompt_dims": "padded"})
    (dst / "config.json").write_text(json.dumps({**fields, **config}))
    for asset in assets:
        write_stats(dst / "assets", asset, lerobot_stats(kind))
    shutil.copy(FIXTURES / kind / "tokenizer.json", dst)
    return dst


def reference(kind: str) -> tuple[dict, dict]:
    d = FIXTURES / kind
    return load_file(str(d / "reference.safetensors")), json.loads((d / "reference.json").read_text())


def images_of(ref: dict) -> dict:
    return {k.removeprefix("image."): v for k, v in ref.items() if k.startswith("image.")}


@pytest.fixture(scope="module", params=KINDS)
def converted(request, tmp_path_factory):
    kind = request.param
    return kind, load_vla(to_openpi(kind, tmp_path_factory.mktemp("openpi") / kind)), *reference(kind)


def test_the_layout_is_read_as_openpi_describes_it(converted):
    kind, model, _, _ = converted
    assert type(model) is {"pi0": Pi0, "pi05": Pi05}[kind]  # told from the weights: no "type", no "pi05" flag
    assert model.cfg.camera_names == ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
    assert (model.cfg.state_dim, model.cfg.action_dim) == (8, 7)  # the statistics' lengths
    assert (model.cfg.horizon, model.cfg.exec_steps, model.cfg.max_state_dim, model.cfg.max_action_dim) == (4, 4, 32,
                                                                                                            32)
    mode = {"pi0": "mean_std", "pi05": "quantiles"}[kind]
    for norm in (model.state_norm, model.action_norm):
        assert (norm.mode, norm.convention, norm.eps) == (mode, "openpi", 1e-6)


def test_outputs_match_the_reference_within_what_the_eps_allows(converted):
    """Velocities at the reference's four times and the K = 10 chunk (normalised and raw) match LeRobot's outputs
    to TOL; the eps moves the normalised state and actions and the raw chunk by less than EPS_TOL, and with
    LeRobot's normalisers swapped in the model is the LeRobot-loaded one exactly."""
    kind, model, ref, meta = converted
    lerobot = load_vla(FIXTURES / kind)
    images, state, noise = images_of(ref), ref["state"], ref["noise"]
    text = model.tokenize(TASKS)
    for ours, theirs, x in ((model.state_norm, lerobot.state_norm, state),
                            (model.action_norm, lerobot.action_norm, ref["actions"])):
        assert 0 < (ours(x) - theirs(x)).abs().max() <= EPS_TOL
    chunk_n = ref["chunk_normalised"][..., :7]
    assert 0 < (model.action_norm.inverse(chunk_n) - lerobot.action_norm.inverse(chunk_n)).abs().max() <= EPS_TOL
    ids, valid = model.prompt_tokens(text, state)
    for row, ok, want, want_ok in zip(ids, valid, ref["tokens"], ref["token_mask"], strict=True):
        assert row[ok].tolist() == want[want_ok].tolist()  # pi0.5: the eps moves no state across a bin edge
    actions = torch.nn.functional.pad(model.action_norm(ref["actions"]), (0, noise.shape[-1] - 7))
    with torch.no_grad():
        cache = model.encode_prefix(images, state, text)
        for tau, v_ref in zip(ref["taus"].tolist(), ref["velocities"], strict=True):
            v, _ = model.expert_forward(cache, tau * noise + (1 - tau) * actions, torch.full((2,), tau))
            assert (v - v_ref).abs().max() <= TOL, f"tau={tau}: {(v - v_ref).abs().max():.2e}"
        assert (model.denoise(cache, noise, meta["num_steps"]) - ref["chunk_normalised"]).abs().max() <= TOL
        raw = model.sample_actions(images, state, text, noise, num_steps=meta["num_steps"])
        assert (raw - ref["chunk_raw"]).abs().max() <= TOL
        model.state_norm, model.action_norm, norms = lerobot.state_norm, lerobot.action_norm, (
            model.state_norm, model.action_norm)
        try:
            assert torch.equal(model.sample_actions(images, state, text, noise),
                               lerobot.sample_actions(images, state, text, noise))
        finally:
            model.state_norm, model.action_norm = norms


@pytest.mark.parametrize("kind", KINDS)
def test_a_bf16_file_loads_into_the_fp32_model(kind, tmp_path):
    """openpi's default: bf16 weights with the SigLIP embeddings and the norms in fp32. The model holds them in
    fp32, equal to the file's values, and samples close to the fp32 reference (bf16 rounding of the weights)."""
    d = to_openpi(kind, tmp_path / kind, bf16=True)
    model = load_vla(d)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    stored = load_file(str(d / "model.safetensors"))
    q = stored["paligemma_with_expert.gemma_expert.model.layers.0.self_attn.q_proj.weight"]
    assert q.dtype == torch.bfloat16 and torch.equal(model.expert.layers[0].self_attn.q_proj.weight, q.float())
    ref, meta = reference(kind)
    with torch.no_grad():
        raw = model.sample_actions(images_of(ref), ref["state"], model.tokenize(TASKS), ref["noise"])
    assert (raw - ref["chunk_raw"]).abs().max() <= 0.05 * ref["chunk_raw"].abs().max()


@pytest.mark.parametrize("kind", KINDS)
def test_openpi_defaults_for_what_its_config_does_not_write(kind, tmp_path):
    """Without max_token_len / state_prompt_dims: openpi's 48 (pi0) / 200 (pi0.5) tokens and the robot's state
    dims in pi0.5's prompt; a "pi05" flag that agrees with the weights is accepted."""
    d = to_openpi(kind, tmp_path / kind, pi05=kind == "pi05")
    _edit_json(d / "config.json", lambda c: [c.pop(k, None) for k in ("max_token_len", "state_prompt_dims")])
    model = load_vla(d)
    assert model.cfg.max_text_len == {"pi0": 48, "pi05": 200}[kind]
    if kind == "pi05":
        assert model.cfg.extra["state_prompt_dims"] == "robot"
        ref, meta = reference(kind)
        prompt = model.full_prompt(meta["tasks"][:1], ref["state"][:1])[0]
        assert len(prompt.split("State: ")[1].split(";")[0].split()) == 8


def test_the_token_embedding_may_be_stored_instead_of_lm_head(tmp_path):
    d = to_openpi("pi0", tmp_path / "pi0")
    w = load_file(str(d / "model.safetensors"))
    w["paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"] = w.pop(
        "paligemma_with_expert.paligemma.lm_head.weight")
    save_file(w, str(d / "model.safetensors"))
    ref, _ = reference("pi0")
    model = load_vla(d)
    with torch.no_grad():
        raw = model.sample_actions(images_of(ref), ref["state"], model.tokenize(TASKS), ref["noise"])
    assert (raw - ref["chunk_raw"]).abs().max() <= TOL


def test_the_asset_is_chosen_by_name_or_taken_when_alone(tmp_path):
    """Two assets: `DIR#ASSET_ID` or asset_id= picks one (its statistics are used); RLinf's layout without the
    assets/ level, with an id holding a slash as openpi's repo-id default does, is taken when alone."""
    d = to_openpi("pi0", tmp_path / "two", assets=("droid", "libero"))
    other = lerobot_stats("pi0")
    other["actions"]["mean"] = [m + 1.0 for m in other["actions"]["mean"]]
    write_stats(d / "assets", "libero", other)
    assert load_vla(f"{d}#libero").action_norm.mean.tolist() == pytest.approx(other["actions"]["mean"])
    assert load_vla(d, asset_id="droid").action_norm.mean.tolist() == pytest.approx(
        lerobot_stats("pi0")["actions"]["mean"])
    rlinf = to_openpi("pi0", tmp_path / "rlinf", assets=())
    write_stats(rlinf, "physical-intelligence/libero", other)
    assert load_vla(rlinf).action_norm.mean.tolist() == pytest.approx(other["actions"]["mean"])
    assert load_vla(f"{rlinf}#physical-intelligence/libero").cfg.action_dim == 7


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _edit_weights(d: Path, edit) -> None:
    w = load_file(str(d / "model.safetensors"))
    edit(w)
    save_file(w, str(d / "model.safetensors"))


def _stats_file(d: Path) -> Path:
    return d / "assets" / "robot" / "norm_stats.json"


V1 = "paligemma_with_expert.paligemma.model.vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight"
BAD = {
    "no norm stats": ("pi0", lambda d: shutil.rmtree(d / "assets"), None, "no normalisation statistics"),
    "two assets, none chosen": ("pi0", lambda d: write_stats(d / "assets", "other", lerobot_stats("pi0")), None,
                                "several asset ids (other, robot): choose one by writing"),
    "unknown asset id": ("pi0", lambda d: None, "nope", "no statistics for asset id 'nope'"),
    "nothing after #": ("pi0", lambda d: None, "", "nothing after '#'"),
    "pi0.5 file under pi05 false": ("pi05", lambda d: _edit_json(d / "config.json", lambda c: c.update(pi05=False)),
                                    None, "state_proj.weight; unexpected keys: expert.layers.0.input_layernorm.dense"),
    "pi0 file under pi05 true": ("pi0", lambda d: _edit_json(d / "config.json", lambda c: c.update(pi05=True)), None,
                                 "state_proj.bias, state_proj.weight; wrong shapes: time_mlp_in.weight"),
    "pi05 not a bool": ("pi0", lambda d: _edit_json(d / "config.json", lambda c: c.update(pi05="yes")), None,
                        "\"pi05\" must be true or false"),
    "bad horizon": ("pi0", lambda d: _edit_json(d / "config.json", lambda c: c.update(action_horizon="4")), None,
                    "action_horizon must be a positive integer, got '4'"),
    "bad precision": ("pi0", lambda d: _edit_json(d / "config.json", lambda c: c.update(precision="int8")), None,
                      "precision 'int8' is not one of"),
    "stats wider than the model": ("pi0", lambda d: _edit_json(d / "config.json", lambda c: c.update(action_dim=6)),
                                   None, "more than the model's action_dim 6"),
    "quantiles missing (pi0.5)": ("pi05", lambda d: _edit_json(_stats_file(d), lambda s: s["norm_stats"]["state"].pop(
        "q01")), None, "norm_stats.state.q01 must be a list of finite numbers"),
    "std shorter than mean": ("pi0", lambda d: _edit_json(_stats_file(d), lambda s: s["norm_stats"]["actions"][
        "std"].pop()), None, "norm_stats.actions: mean and std differ in length"),
    "no norm_stats object": ("pi0", lambda d: _stats_file(d).write_text("{}"), None, "no \"norm_stats\" object"),
    "norm stats not JSON": ("pi0", lambda d: _stats_file(d).write_text("{"), None, "cannot read"),
    "no tokenizer": ("pi0", lambda d: (d / "tokenizer.json").unlink(), None, "has no tokenizer.json"),
    "neither model's heads": ("pi0", lambda d: _edit_weights(d, lambda w: [w.pop(k) for k in list(w) if k.startswith(
        ("state_proj", "action_time_mlp"))]), None, "cannot tell pi0 from pi0.5"),
    "keys missing, unexpected, misshapen": ("pi0", lambda d: _edit_weights(d, lambda w: w.update(
        {"extra_head.weight": torch.zeros(2), V1: torch.zeros(3, 3), "state_proj.weight": w.pop("state_proj.bias")})),
        None, "missing keys: state_proj.bias; unexpected keys: extra_head.weight; wrong shapes: state_proj.weight "
              "(32,) (model: (32, 32)), vision.encoder.layers.1.mlp.fc1.weight (3, 3)"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_openpi_checkpoints_are_one_line(name, tmp_path):
    kind, breakage, asset, fragment = BAD[name]
    d = to_openpi(kind, tmp_path / "ckpt")
    breakage(d)
    with pytest.raises(UserError) as err:
        load_vla(d if asset is None else f"{d}#{asset}")
    assert "\n" not in str(err.value) and fragment in str(err.value), str(err.value)


def test_an_asset_id_on_a_lerobot_directory_is_refused():
    with pytest.raises(UserError, match="picks the statistics of an openpi checkpoint"):
        load_vla(FIXTURES / "pi0", asset_id="robot")


@pytest.mark.parametrize("breakage,fragment", [
    (lambda d: write_stats(d / "assets", "other", lerobot_stats("pi0")), "several asset ids"),
    (lambda d: _edit_json(d / "config.json", lambda c: c.update(action_horizon=0)), "action_horizon must be"),
])
def test_sft_refuses_a_bad_openpi_backbone_before_work(breakage, fragment, tmp_path):
    """The CLI's side of the table above (exit 2, one line, nothing written): the asset choice and config.json are
    checked before the output directory is made."""
    d = to_openpi("pi0", tmp_path / "ckpt")
    breakage(d)
    args = ["sft", "--data", f"lerobot:{DATASET}", "--out", tmp_path / "out", "--steps", "1",
            "--backbone", f"openpi:{d}"]
    assert_refused_unchanged("sim-trainer", args, watched=[d, DATASET], contains=fragment)
    assert not (tmp_path / "out").exists()


def test_sft_from_an_openpi_checkpoint_keeps_openpi_normalisation(tmp_path):
    """`sft --backbone openpi:DIR#ASSET` trains from it; the checkpoint it writes reloads with openpi's eps and
    exports (the normaliser is in the graph) within the export's parity bound."""
    from sim_trainer.export.onnx_export import export_onnx
    from sim_trainer.models.checkpoint import load_checkpoint
    d = to_openpi("pi05", tmp_path / "ckpt", assets=("a", "b"))
    result = run_cli("sim-trainer", ["sft", "--data", f"lerobot:{DATASET}", "--out", tmp_path / "out",
                                     "--backbone", f"openpi:{d}#b", "--steps", "1", "--batch-size", "2",
                                     "--horizon", "4", "--exec-steps", "2", "--num-steps", "2", "--warmup", "0",
                                     "--threads", "1"])
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model"]["normalization_convention"] == "openpi"
    model = load_checkpoint(tmp_path / "out").model
    assert type(model) is Pi05 and (model.cfg.state_dim, model.cfg.action_dim) == (3, 2)
    assert (model.action_norm.convention, model.action_norm.eps) == ("openpi", 1e-6)
    assert export_onnx(tmp_path / "out", tmp_path / "export", num_steps=2).manifest["parity"]["max_abs_err"] <= TOL
