"""Golden SmolVLA fixture: a tiny randomly initialised LeRobot SmolVLA policy and its outputs on fixed inputs.

Runs ONLY in the LeRobot reference venv (scripts/lerobot_reference_venv.sh), never under `make test`:

    .venv-lerobot/bin/python scripts/make_smolvla_fixture.py [--out tests/fixtures/smolvla]

It writes, under OUT:
  policy/           the policy exactly as LeRobot saves it (config.json, model.safetensors, processor files with
                    the normaliser stats), plus policy/smolvlm/: the tiny SmolVLM backbone's config.json and
                    tokenizer files that the policy's `vlm_model_name` ("smolvlm", relative) names; the tokenizer
                    files are also copied into policy/ (the checkpoint directory our loader reads first)
  reference.safetensors  fixed inputs (raw uint8 images, raw state, raw actions, noise, x, tau) and the reference's
                    outputs: token ids and mask of LeRobot's preprocessor, velocities at several tau through the
                    cached prefix, the training loss at fixed noise and time, the K=10 sampled chunk
  reference.json    the instructions, the camera names, what was patched and the reference's versions
and the same for two other layouts under OUT/variants/ (an expert with half the layers; self-attention only).

SmolVLA takes every size from its backbone's config (`vlm_model_name`), so nothing in LeRobot is patched: the tiny
sizes live in the SmolVLM config written here (8 attention heads, 2 key/value heads, as the real model's grouped
attention). The tests (tests/test_vla_smolvla.py) load policy/ with our loader and compare.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

CAMERAS = ("top", "wrist")  # a third, absent camera is one of LeRobot's `empty_cameras`
IMAGE_SHAPES = {"top": (24, 40), "wrist": (32, 32)}  # top is resized with padding to the backbone's 32x32
STATE_DIM, ACTION_DIM, CHUNK = 5, 4, 6
INSTRUCTIONS = ["pick up the red cube", "open the top drawer and put the sponge inside it"]
TAUS = (1.0, 0.73, 0.41, 0.05)
SPECIAL = ["<|im_end|>", "<fake_token_around_image>", "<global-img>", "<image>", "<end_of_utterance>"]


def tiny_tokenizer(directory: Path) -> None:
    """A byte-level BPE tokenizer (the kind SmolVLM2 uses) trained on a few sentences: about 300 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = INSTRUCTIONS + ["pick place push open close the a cube drawer sponge red green blue\n"] * 4
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|im_end|>", eos_token="<|im_end|>",
        extra_special_tokens={"fake_image_token": "<fake_token_around_image>", "global_image_token": "<global-img>",
                              "image_token": "<image>", "end_of_utterance_token": "<end_of_utterance>"})
    fast.save_pretrained(directory)


def tiny_backbone(directory: Path) -> None:
    """config.json (+ processor files, which LeRobot's SmolVLA loads) of a tiny SmolVLM: the sizes of the test."""
    from transformers import (
        AutoTokenizer,
        SmolVLMConfig,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )

    tiny_tokenizer(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    config = SmolVLMConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        text_config=dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=4, vocab_size=len(tokenizer),
                         rms_norm_eps=1e-5, max_position_embeddings=256, rope_theta=100000.0,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id),
        scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"), tie_word_embeddings=False)
    config.save_pretrained(directory)
    image_processor = SmolVLMImageProcessor(size={"longest_edge": 32}, max_image_size={"longest_edge": 32})
    video_processor = SmolVLMVideoProcessor(size={"longest_edge": 32}, max_image_size={"longest_edge": 32})
    SmolVLMProcessor(image_processor, tokenizer, video_processor, image_seq_len=4).save_pretrained(directory)


def perturb_norms(policy: torch.nn.Module, gen: torch.Generator) -> None:
    """Norm weights start at exactly 1: move them, so a model that skipped or misplaced a norm would not match."""
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


# (sub-directory, LeRobot config overrides): the default layout of smolvla_base, then the other layouts LeRobot can
# run: an expert with half the layers (cross-attention everywhere, as LeRobot needs for unpaired layers) and joint
# self-attention in every layer
FIXTURES = (("", {}),
            ("variants/half_expert", {"num_expert_layers": 2, "self_attn_every_n_layers": -1}),
            ("variants/self_attn", {"attention_mode": "self_attn", "num_vlm_layers": 2}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures/smolvla", help="fixture directory (replaced)")
    out = Path(ap.parse_args().out).resolve()
    if out.exists():
        shutil.rmtree(out)
    for sub, overrides in FIXTURES:
        write_fixture(out / sub if sub else out, overrides)
    print("patched: nothing in LeRobot (sizes come from the tiny SmolVLM backbone config policy/smolvlm/config.json)")
    print(f"wrote {out}: {sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 1e6:.2f} MB")


def write_fixture(out: Path, overrides: dict) -> None:
    """One tiny policy under out/policy and the reference's outputs on fixed inputs in out/reference.*."""
    import lerobot
    import transformers
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy, make_att_2d_masks
    from lerobot.policies.smolvla.processor_smolvla import make_smolvla_pre_post_processors
    from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS

    policy_dir = out / "policy"
    (policy_dir / "smolvlm").mkdir(parents=True)
    tiny_backbone(policy_dir / "smolvlm")
    os.chdir(policy_dir)  # LeRobot resolves vlm_model_name "smolvlm" against the working directory

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    features = {"observation.state": PolicyFeature(type=FeatureType.STATE, shape=(STATE_DIM,))}
    for cam in CAMERAS:
        features[f"observation.images.{cam}"] = PolicyFeature(type=FeatureType.VISUAL, shape=(3, *IMAGE_SHAPES[cam]))
    config = SmolVLAConfig(
        input_features=features,
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,))},
        chunk_size=CHUNK, n_action_steps=CHUNK, max_state_dim=8, max_action_dim=8,
        resize_imgs_with_padding=(32, 32), tokenizer_max_length=16, empty_cameras=1,
        **{**dict(num_vlm_layers=4, vlm_model_name="smolvlm", load_vlm_weights=False, device="cpu",
                  push_to_hub=False), **overrides})
    policy = SmolVLAPolicy(config).eval()
    perturb_norms(policy, gen)
    stats = {"observation.state": {"mean": torch.randn(STATE_DIM, generator=gen),
                                   "std": torch.rand(STATE_DIM, generator=gen) + 0.5},
             "action": {"mean": torch.randn(ACTION_DIM, generator=gen),
                        "std": torch.rand(ACTION_DIM, generator=gen) + 0.5}}
    pre, post = make_smolvla_pre_post_processors(config, dataset_stats=stats)
    policy.save_pretrained(policy_dir)
    pre.save_pretrained(policy_dir)
    post.save_pretrained(policy_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (policy_dir / "smolvlm" / name).exists():
            shutil.copy(policy_dir / "smolvlm" / name, policy_dir / name)

    b = len(INSTRUCTIONS)
    ref: dict[str, torch.Tensor] = {}
    for cam in CAMERAS:
        ref[f"image.{cam}"] = torch.randint(0, 256, (b, *IMAGE_SHAPES[cam], 3), generator=gen, dtype=torch.uint8)
    ref["state"] = torch.randn(b, STATE_DIM, generator=gen) * 2
    ref["actions"] = torch.randn(b, CHUNK, ACTION_DIM, generator=gen) * 2
    ref["noise"] = torch.randn(b, CHUNK, config.max_action_dim, generator=gen)
    ref["x"] = torch.randn(b, CHUNK, config.max_action_dim, generator=gen)
    ref["tau"] = torch.tensor(TAUS)
    ref["train_noise"] = torch.randn(b, CHUNK, config.max_action_dim, generator=gen)
    ref["train_tau"] = torch.tensor([0.83, 0.27])

    raw = {"observation.state": ref["state"].clone(), "action": ref["actions"].clone(), "task": list(INSTRUCTIONS)}
    for cam in CAMERAS:
        raw[f"observation.images.{cam}"] = ref[f"image.{cam}"].permute(0, 3, 1, 2).float() / 255.0
    batch = pre(raw)
    ref["tokens"] = batch[OBS_LANGUAGE_TOKENS]
    ref["token_mask"] = batch[OBS_LANGUAGE_ATTENTION_MASK].bool()
    model = policy.model
    with torch.no_grad():
        loss, _ = policy.forward(dict(batch), noise=ref["train_noise"], time=ref["train_tau"])
        ref["train_loss"] = loss.reshape(1)
        images, img_masks = policy.prepare_images(batch)
        state = policy.prepare_state(batch)
        embs, pad, att = model.embed_prefix(images, img_masks, ref["tokens"], ref["token_mask"], state=state)
        _, cache = model.vlm_with_expert.forward(
            attention_mask=make_att_2d_masks(pad, att), position_ids=torch.cumsum(pad, dim=1) - 1,
            past_key_values=None, inputs_embeds=[embs, None], use_cache=True, fill_kv_cache=True)
        ref["velocity"] = torch.stack([model.denoise_step(pad, cache, ref["x"], torch.full((b,), t)) for t in TAUS])
        policy.reset()
        chunk = policy.predict_action_chunk(dict(batch), noise=ref["noise"].clone())
        ref["chunk_normalised"] = chunk
        ref["chunk"] = post(chunk)
    save_file({k: v.contiguous() for k, v in ref.items()}, out / "reference.safetensors")
    meta = {"instructions": INSTRUCTIONS, "cameras": list(CAMERAS), "taus": list(TAUS), "num_steps": config.num_steps,
            "patched": "nothing: every size comes from the tiny SmolVLM config in policy/smolvlm",
            "config_overrides": overrides,
            "reference": f"lerobot {lerobot.__version__}, transformers {transformers.__version__}, "
                         f"torch {torch.__version__}"}
    (out / "reference.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
