#!/usr/bin/env python
"""SmolVLA's memory plan at its real size (SmolVLM2-500M's published config), computed, not measured.

The model is built on PyTorch's meta device (shapes only: no memory, no arithmetic), so this runs in seconds on
any machine. Parameters are counted per group; weights, gradients and AdamW moments follow from them (fp32, as
`sim-trainer sft` / `rl` train). Activations are the bytes of the tensors autograd saves for the backward pass of
one sample (each stored tensor counted once, the model's own parameters not counted):

- RL: `RLPolicy.evaluate_chain`, the learner's log-prob recomputation of one chunk sample (K denoising steps of H
  action tokens through the expert, the prefix encoded again);
- SFT: `flow_matching_loss` of one sample (the prefix and one velocity evaluation).

Expert only (`--expert-only`, as the presets configs/rl_smolvla_gpu.yaml and sft_smolvla_gpu.yaml train): vision
and language frozen, the expert and the heads trained. `state_proj` is a head, and the state token's keys and
values pass through every kept language-model layer, so those layers' activations are stored too.
Not counted: the allocator's slack, transient buffers of the forward pass (freed before backward), CUDA context,
and the simulator. Prints a Markdown table, then one line of JSON (the last line of stdout).
"""

from __future__ import annotations

import argparse
import contextlib
import json

import torch

from sim_trainer.models.interface import freeze_groups
from sim_trainer.models.vla.smolvla import SmolVLAConfig, SmolVLAPolicy
from sim_trainer.models.vla.smolvla_io import MeanStdNormalizer
from sim_trainer.rl.policy import RLPolicy, SamplerSettings

# HuggingFaceTB/SmolVLM2-500M-Video-Instruct, the backbone of lerobot/smolvla_base (its config.json's sizes)
SMOLVLM2_500M = {
    "scale_factor": 4,
    "text_config": {"model_type": "llama", "hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
                    "num_attention_heads": 15, "num_key_value_heads": 5, "head_dim": 64, "vocab_size": 49280,
                    "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "pad_token_id": 2},
    "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                      "num_attention_heads": 12, "image_size": 512, "patch_size": 16},
}
GB = 1e9


def build(args: argparse.Namespace) -> SmolVLAPolicy:
    """smolvla_base's layout (16 of 32 layers kept, expert 0.75 wide, cross-attention every other layer)."""
    from transformers import SmolVLMConfig

    cameras = tuple(f"camera_{i}" for i in range(args.cameras))
    cfg = SmolVLAConfig(horizon=args.horizon, action_dim=args.action_dim, state_dim=args.state_dim,
                        num_steps=args.num_steps, exec_steps=min(8, args.horizon), camera_names=cameras,
                        image_size=512, max_text_len=args.text_len)
    with torch.device("meta"):
        s, a = torch.zeros(args.state_dim), torch.zeros(args.action_dim)
        return SmolVLAPolicy(cfg, SmolVLMConfig(**SMOLVLM2_500M), MeanStdNormalizer(s, s + 1, 1e-8),
                             MeanStdNormalizer(a, a + 1, 1e-8))


@contextlib.contextmanager
def saved_bytes(module: torch.nn.Module):
    """Counts the bytes of every tensor autograd saves inside the block into the yielded list (one entry per
    distinct storage; the module's own parameters and buffers are resident anyway and not counted)."""
    resident = {id(t) for t in (*module.parameters(), *module.buffers())}
    seen, keep, sizes = set(), [], []

    def pack(x: torch.Tensor) -> torch.Tensor:
        base = x if x._base is None else x._base
        if id(base) not in resident and id(x) not in resident and id(base) not in seen:
            seen.add(id(base))
            keep.append(base)  # alive until the end, so no id is reused
            sizes.append(base.numel() * base.element_size())
        return x

    real_autocast = torch.autocast
    torch.autocast = lambda *a, **k: contextlib.nullcontext()  # autocast knows no meta device; it is off here
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            yield sizes
    finally:
        torch.autocast = real_autocast


def inputs(model: SmolVLAPolicy, args: argparse.Namespace) -> tuple[dict, torch.Tensor, torch.Tensor]:
    images = {c: torch.zeros(1, 512, 512, 3, dtype=torch.uint8, device="meta") for c in model.cfg.camera_names}
    text = torch.ones(1, args.text_len, dtype=torch.long, device="meta")  # every token valid: the longest prompt
    return images, torch.zeros(1, args.state_dim, device="meta"), text


def rl_activations(model: SmolVLAPolicy, args: argparse.Namespace) -> int:
    with torch.device("meta"):
        policy = RLPolicy(model, SamplerSettings("flow_noise", args.num_steps, "mixed"), "prefix",
                          -torch.ones(args.action_dim), torch.ones(args.action_dim))
    images, state, text = inputs(model, args)
    chain = torch.zeros(1, args.num_steps + 1, args.horizon, args.action_dim, device="meta")
    stochastic = torch.ones(1, args.num_steps, dtype=torch.bool, device="meta")
    with saved_bytes(policy) as sizes:
        policy.evaluate_chain({"images": images, "state": state}, text, chain, stochastic)
    return sum(sizes)


def sft_activations(model: SmolVLAPolicy, args: argparse.Namespace) -> int:
    images, state, text = inputs(model, args)
    actions = torch.zeros(1, args.horizon, args.action_dim, device="meta")
    with saved_bytes(model) as sizes:
        model.flow_matching_loss(images, state, text, actions, noise=torch.zeros_like(actions),
                                 tau=torch.full((1,), 0.5, device="meta"))
    return sum(sizes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cameras", type=int, default=1, help="camera images per sample (each 64 tokens at 512 px)")
    p.add_argument("--text-len", type=int, default=48, help="instruction tokens (tokenizer_max_length)")
    p.add_argument("--horizon", type=int, default=16, help="chunk length H")
    p.add_argument("--num-steps", type=int, default=4, help="denoising steps K of the RL chain")
    p.add_argument("--state-dim", type=int, default=9)
    p.add_argument("--action-dim", type=int, default=8)
    p.add_argument("--rl-minibatch", type=int, default=32, help="chunk samples per RL gradient step")
    p.add_argument("--sft-batch", type=int, default=64, help="samples per SFT step")
    args = p.parse_args()

    model = build(args)
    groups = {k: sum(t.numel() for t in v) for k, v in model.parameter_groups().items()}
    total = model.num_parameters()
    freeze_groups(model.parameter_groups(), ("vision", "language"))
    trainable = sum(t.numel() for t in model.parameters() if t.requires_grad)
    rl, sft = rl_activations(model, args), sft_activations(model, args)
    result = {
        "parameters": groups, "total": total, "trainable_expert_only": trainable,
        "weights_fp32_gb": total * 4 / GB, "weights_bf16_gb": total * 2 / GB,
        "grads_fp32_gb": trainable * 4 / GB, "adamw_fp32_gb": trainable * 8 / GB,
        "rl_activations_per_sample_gb": rl / GB, "sft_activations_per_sample_gb": sft / GB,
        "rl_activations_minibatch_gb": rl * args.rl_minibatch / GB,
        "sft_activations_batch_gb": sft * args.sft_batch / GB,
        "settings": vars(args),
    }
    print("| | SmolVLA, expert only |\n|---|---|")
    for name, n in groups.items():
        print(f"| {name} parameters | {n / 1e6:.1f} M |")
    print(f"| total / trainable | {total / 1e6:.1f} M / {trainable / 1e6:.1f} M |")
    print(f"| weights fp32 (bf16) | {total * 4 / GB:.2f} GB ({total * 2 / GB:.2f} GB) |")
    print(f"| gradients + AdamW moments, fp32 | {trainable * 4 / GB:.2f} GB + {trainable * 8 / GB:.2f} GB |")
    print(f"| RL activations, per sample / minibatch {args.rl_minibatch} | {rl / 1e6:.0f} MB / "
          f"{rl * args.rl_minibatch / GB:.1f} GB |")
    print(f"| SFT activations, per sample / batch {args.sft_batch} | {sft / 1e6:.0f} MB / "
          f"{sft * args.sft_batch / GB:.1f} GB |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
