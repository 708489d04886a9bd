"""Reference fixtures for pi0 / pi0.5: tiny random LeRobot policies, saved in LeRobot's format, with the reference
outputs our tests must reproduce (tests/test_vla_pi0.py).

Runs ONLY in the LeRobot reference venv (scripts/lerobot_reference_venv.sh), never in the project's venv:

    .venv-lerobot/bin/python scripts/make_pi_fixtures.py [--model pi0|pi05|all] [--out tests/fixtures]

LeRobot 0.4.4's pi0 / pi0.5 need the patched transformers its `pi` extra pins (huggingface/transformers branch
fix/lerobot_openpi, transformers 4.53 with adaRMS and cache-reading changes); the script refuses to run
without it. LeRobot accepts only the full-size variants and hard-codes some sizes, so the script patches those
size tables (and only them: every computation is LeRobot's) and prints what it patched. Attention keeps 8 heads
and one kv head, as LeRobot's joint attention assumes.

Each fixture directory holds what `lerobot` saves (config.json, model.safetensors, policy_pre/postprocessor
JSON + normaliser safetensors), a tiny character-level tokenizer.json (the tokenizer LeRobot's tokenizer step
used), and reference.safetensors + reference.json: fixed inputs (two cameras of three, the third missing), fixed
noise and flow times, the velocity at each time, the K=10 sampled chunk (normalised and raw) and the loss;
and full_size_layout.json, the key names and shapes of the real-size policy (no weights), so the tests check
that a real checkpoint's every key fits our model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

VOCAB = 128  # tiny embedding rows (the tokenizer below uses fewer)
LM = dict(width=64, depth=2, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=16)
EXPERT = dict(width=32, depth=2, mlp_dim=64, num_heads=8, num_kv_heads=1, head_dim=16)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=8)
IMAGE, STATE_DIM, ACTION_DIM, HORIZON, BATCH = 32, 8, 7, 4, 2
CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")  # the last is left out of the batch
TEXT_LEN = {"pi0": 24, "pi05": 200}
TASKS = ["pick up the red cube and put it in the bowl", "open_the drawer"]
TAUS = [1.0, 0.75, 0.4, 0.1]


def require_reference() -> None:
    try:
        from transformers.models.siglip import check
        ok = check.check_whether_transformers_replace_is_installed_correctly()
    except ImportError:
        ok = False
    if not ok:
        sys.exit("error: LeRobot's pi0/pi0.5 need the patched transformers of lerobot's `pi` extra "
                 "(branch fix/lerobot_openpi); this interpreter has stock transformers")


def patch_sizes(modeling) -> None:
    """Shrink LeRobot's size tables and hard-coded sizes (vocab, SigLIP, projector); print each patch."""
    real_paligemma, real_gemma = modeling.PaliGemmaForConditionalGeneration, modeling.GemmaForCausalLM

    def gemma_config(variant):
        return modeling.GemmaConfig(**(LM if variant == "gemma_2b" else EXPERT))

    def paligemma(config):
        config.text_config.vocab_size = VOCAB
        config.image_token_index = VOCAB
        for k, v in VISION.items():
            setattr(config.vision_config, k, v)
        config.vision_config.projection_dim = LM["width"]
        return real_paligemma(config=config)

    def gemma(config):
        config.vocab_size = VOCAB
        return real_gemma(config=config)

    modeling.get_gemma_config = gemma_config
    modeling.PaliGemmaForConditionalGeneration = paligemma
    modeling.GemmaForCausalLM = gemma
    print(f"patched {modeling.__name__}: get_gemma_config gemma_2b -> {LM}, gemma_300m -> {EXPERT}; "
          f"PaliGemma vocab 257152 -> {VOCAB}, SigLIP {VISION}, projection_dim 2048 -> {LM['width']}; "
          f"expert vocab 257152 -> {VOCAB}")


def tiny_tokenizer(out: Path):
    """A character-level tokenizer with PaliGemma's conventions (<pad> = 0, <bos> prepended), as tokenizer.json."""
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok.add_special_tokens(["<pad>", "<eos>", "<bos>", "<unk>"])
    tok.save(str(out / "tokenizer.json"))
    return PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"), pad_token="<pad>",
                                   bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Fresh random weights everywhere (zero-initialised adaRMS layers would make the expert an identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            std = p.shape[-1] ** -0.5 if p.ndim >= 2 else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * std)


def save_full_size_layout(kind: str, out: Path) -> None:
    """Key -> shape of the full-size policy as LeRobot saves it (built on the meta device, before any size
    patch; the tied token embedding is stored as lm_head only, as save_pretrained leaves it)."""
    from lerobot.configs.types import FeatureType, PolicyFeature
    if kind == "pi0":
        from lerobot.policies.pi0 import modeling_pi0 as modeling
        from lerobot.policies.pi0.configuration_pi0 import PI0Config as Config
        core = modeling.PI0Pytorch
    else:
        from lerobot.policies.pi05 import modeling_pi05 as modeling
        from lerobot.policies.pi05.configuration_pi05 import PI05Config as Config
        core = modeling.PI05Pytorch
    feats = {"observation.images.base_0_rgb": PolicyFeature(FeatureType.VISUAL, (3, 224, 224)),
             "observation.state": PolicyFeature(FeatureType.STATE, (STATE_DIM,))}
    config = Config(input_features=feats, output_features={"action": PolicyFeature(FeatureType.ACTION,
                                                                                   (ACTION_DIM,))}, device="cpu")
    with torch.device("meta"):
        state = core(config).state_dict()
    state.pop("paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight")
    layout = {f"model.{k}": list(v.shape) for k, v in state.items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "full_size_layout.json").write_text(json.dumps(layout, indent=0))
    print(f"{kind}: {len(layout)} full-size keys -> {out / 'full_size_layout.json'}")


def make(kind: str, root: Path) -> None:
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.processor import tokenizer_processor
    from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS
    if kind == "pi0":
        from lerobot.policies.pi0 import modeling_pi0 as modeling
        from lerobot.policies.pi0.configuration_pi0 import PI0Config as Config
        from lerobot.policies.pi0.processor_pi0 import make_pi0_pre_post_processors as make_processors
        policy_cls = modeling.PI0Policy
    else:
        from lerobot.policies.pi05 import modeling_pi05 as modeling
        from lerobot.policies.pi05.configuration_pi05 import PI05Config as Config
        from lerobot.policies.pi05.processor_pi05 import make_pi05_pre_post_processors as make_processors
        policy_cls = modeling.PI05Policy
    out = root / kind
    out.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer(out)

    class TinyAutoTokenizer:  # the processor asks the Hub for PaliGemma's tokenizer: hand it the tiny one
        @staticmethod
        def from_pretrained(name, **_):
            print(f"tokenizer {name} -> the tiny character tokenizer")
            return tok

    tokenizer_processor.AutoTokenizer = TinyAutoTokenizer
    patch_sizes(modeling)

    g = torch.Generator().manual_seed(1234 if kind == "pi0" else 5678)
    feats = {f"observation.images.{c}": PolicyFeature(FeatureType.VISUAL, (3, IMAGE, IMAGE)) for c in CAMERAS}
    feats["observation.state"] = PolicyFeature(FeatureType.STATE, (STATE_DIM,))
    config = Config(input_features=feats, output_features={"action": PolicyFeature(FeatureType.ACTION,
                                                                                   (ACTION_DIM,))},
                    chunk_size=HORIZON, n_action_steps=HORIZON, image_resolution=(IMAGE, IMAGE),
                    tokenizer_max_length=TEXT_LEN[kind], dtype="float32", device="cpu")

    def stat(dim, lo, hi):
        return torch.rand(dim, generator=g) * (hi - lo) + lo

    stats = {}
    for key, dim in (("observation.state", STATE_DIM), ("action", ACTION_DIM)):
        mean, std = stat(dim, -1, 1), stat(dim, 0.2, 2)
        stats[key] = {"mean": mean, "std": std, "min": mean - 3 * std, "max": mean + 3 * std,
                      "q01": mean - 2 * std, "q99": mean + 2 * std}
    policy = policy_cls(config)
    randomize(policy, seed=7 if kind == "pi0" else 8)
    policy.eval()
    pre, post = make_processors(config, dataset_stats=stats)

    images = {c: torch.randint(0, 256, (BATCH, IMAGE, IMAGE, 3), generator=g, dtype=torch.uint8)
              for c in CAMERAS[:2]}
    state = stats["observation.state"]["mean"] + stats["observation.state"]["std"] * torch.randn(
        BATCH, STATE_DIM, generator=g) * 1.5
    actions = stats["action"]["mean"] + stats["action"]["std"] * torch.randn(BATCH, HORIZON, ACTION_DIM, generator=g)
    noise = torch.randn(BATCH, HORIZON, config.max_action_dim, generator=g)
    loss_tau = torch.tensor([0.3, 0.8])
    raw = {f"observation.images.{c}": im.permute(0, 3, 1, 2).float() / 255.0 for c, im in images.items()}
    batch = pre({**raw, "observation.state": state.clone(), "action": actions.clone(), "task": list(TASKS)})

    m = policy.model
    with torch.no_grad():
        imgs, img_masks = policy._preprocess_images(batch)
        tokens, masks = batch[OBS_LANGUAGE_TOKENS], batch[OBS_LANGUAGE_ATTENTION_MASK]
        state_in = modeling.pad_vector(batch["observation.state"], config.max_state_dim)
        actions_in = modeling.pad_vector(batch["action"], config.max_action_dim)
        prefix_embs, prefix_pad, prefix_att = m.embed_prefix(imgs, img_masks, tokens, masks)
        att_4d = m._prepare_attention_masks_4d(modeling.make_att_2d_masks(prefix_pad, prefix_att))
        _, past = m.paligemma_with_expert.forward(attention_mask=att_4d, position_ids=torch.cumsum(prefix_pad, 1) - 1,
                                                  past_key_values=None, inputs_embeds=[prefix_embs, None],
                                                  use_cache=True)
        velocities = []
        for tau in TAUS:
            x_t = tau * noise + (1 - tau) * actions_in
            t = torch.full((BATCH,), tau, dtype=torch.float32)
            step = (dict(state=state_in) if kind == "pi0" else {})
            velocities.append(m.denoise_step(prefix_pad_masks=prefix_pad, past_key_values=past, x_t=x_t,
                                             timestep=t, **step))
        sample_args = (imgs, img_masks, tokens, masks, state_in) if kind == "pi0" else (imgs, img_masks, tokens, masks)
        chunk_norm = m.sample_actions(*sample_args, noise=noise.clone(), num_steps=10)
        chunk_raw = post(chunk_norm[:, :, :ACTION_DIM].clone())
        forward_args = (imgs, img_masks, tokens, masks, state_in) if kind == "pi0" else (imgs, img_masks, tokens,
                                                                                          masks)
        losses = m.forward(*forward_args, actions_in, noise=noise.clone(), time=loss_tau)
        loss = losses[:, :, :ACTION_DIM].mean()

    policy.save_pretrained(out)
    pre.save_pretrained(out)
    post.save_pretrained(out)
    from safetensors.torch import save_file
    tensors = {f"image.{c}": im for c, im in images.items()}
    tensors.update(state=state, actions=actions, noise=noise, taus=torch.tensor(TAUS), loss_tau=loss_tau,
                   tokens=tokens.long(), token_mask=masks.bool(), state_normed=batch["observation.state"],
                   velocities=torch.stack(velocities), chunk_normalised=chunk_norm, chunk_raw=chunk_raw,
                   loss=loss.reshape(1))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "reference.safetensors"))
    (out / "reference.json").write_text(json.dumps({"tasks": TASKS, "cameras_given": list(CAMERAS[:2]),
                                                    "num_steps": 10}, indent=1))
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"{kind}: wrote {out} ({size / 1e6:.2f} MB); loss {loss.item():.6f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("pi0", "pi05", "all"), default="all")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "tests" / "fixtures")
    args = ap.parse_args()
    require_reference()
    torch.manual_seed(0)
    for kind in ("pi0", "pi05") if args.model == "all" else (args.model,):
        save_full_size_layout(kind, args.out / kind)
        make(kind, args.out)


if __name__ == "__main__":
    main()
