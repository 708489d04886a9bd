#!/usr/bin/env python
"""The memory plan of expert-only pi0 / pi0.5 training by --precision and --frozen-dtype: computed, not measured.

Builds the published pi0 and pi0.5 sizes (PaliGemma: SigLIP So400m/14 at 224 px + Gemma 2B; Gemma 300M action
expert) on PyTorch's meta device (no memory, no download), counts each parameter group and prints, per mode, the
bytes of: frozen weights (fp32, or bf16 with --frozen-dtype bf16), trainable weights (always fp32 masters), the
bf16 copies of the trainable weights that autocast keeps for the backward pass, gradients (fp32), AdamW moments
(fp32, two per trainable parameter) and SFT's EMA copy of the weights. Activations are not included (see
docs/models.md). GB are 10^9 bytes. Prints a Markdown table, then one line of JSON (the last line of stdout).
Runs in seconds on a CPU; `--smoke` is the same (there is no larger size).
"""

from __future__ import annotations

import argparse
import json

import torch

from sim_trainer.models.vla import Pi0, Pi05
from sim_trainer.models.vla.common import StatsNormalizer, VLAConfig
from sim_trainer.models.vla.loader import GEMMA_VARIANTS, SIGLIP_SO400M

MODES = (("fp32", "fp32"), ("bf16", "fp32"), ("bf16", "bf16"))  # (precision, frozen_dtype)
FROZEN = ("vision", "language")  # --expert-only
BYTES = {"fp32": 4, "bf16": 2}


def group_sizes(cls) -> dict[str, int]:
    """Parameters per group of the published size (three camera slots, as LeRobot's base policies)."""
    cfg = VLAConfig(lm=GEMMA_VARIANTS["gemma_2b"], expert=GEMMA_VARIANTS["gemma_300m"], vision=SIGLIP_SO400M,
                    camera_names=("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"), state_dim=32, action_dim=32)
    with torch.device("meta"):
        model = cls(cfg, StatsNormalizer("identity", {}), StatsNormalizer("identity", {}))
    return {name: sum(p.numel() for p in ps) for name, ps in model.parameter_groups().items()}


def plan(sizes: dict[str, int], precision: str, frozen_dtype: str) -> dict[str, float]:
    frozen = sum(n for g, n in sizes.items() if g in FROZEN)
    trainable = sum(n for g, n in sizes.items() if g not in FROZEN)
    gb = 1e-9
    rows = {"frozen_weights": frozen * BYTES[frozen_dtype] * gb, "trainable_weights": trainable * 4 * gb,
            "autocast_weight_copies": trainable * 2 * gb if precision == "bf16" else 0.0,
            "gradients": trainable * 4 * gb, "adamw": trainable * 8 * gb}
    rows["total_rl"] = sum(rows.values())
    rows["sft_ema"] = (frozen * BYTES[frozen_dtype] + trainable * 4) * gb
    rows["total_sft"] = rows["total_rl"] + rows["sft_ema"]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="the same computation (it is already small)")
    p.parse_args()
    results = {}
    for name, cls in (("pi0", Pi0), ("pi0.5", Pi05)):
        sizes = group_sizes(cls)
        results[name] = {"parameters": sizes,
                         "modes": {f"{prec}/frozen {fd}": plan(sizes, prec, fd) for prec, fd in MODES}}
    keys = ("frozen_weights", "trainable_weights", "autocast_weight_copies", "gradients", "adamw", "total_rl",
            "sft_ema", "total_sft")
    for name, r in results.items():
        sizes = r["parameters"]
        frozen = sum(n for g, n in sizes.items() if g in FROZEN)
        print(f"\n{name}, expert only: {frozen / 1e6:.1f} M frozen, {(sum(sizes.values()) - frozen) / 1e6:.1f} M "
              "trainable (GB, computed)\n")
        modes = list(r["modes"])
        print("| | " + " | ".join(modes) + " |")
        print("|---" * (len(modes) + 1) + "|")
        for k in keys:
            print(f"| {k} | " + " | ".join(f"{r['modes'][m][k]:.2f}" for m in modes) + " |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
