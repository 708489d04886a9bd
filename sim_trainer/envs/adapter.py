"""Turn a ManiSkill observation dict into the policy's observation: camera images + a flat state vector.

Used by every backend (CPU worker processes, the GPU batched env, the ROS 2 sim twin), so the policy
sees the same layout everywhere. The instruction is constant per episode and lives in the PolicySpec.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Observation = dict  # {"state": float32 [B, S], "images": {camera: uint8 [B, H, W, 3]}}
# (RL envs built with privileged=True add "privileged": float32 [B, P], read by the critic only; vec_env.py)


def state_layout(raw_obs: dict) -> tuple[tuple[str, int], ...]:
    """Names and sizes of the flat state blocks: robot proprioception first, then task extras."""
    layout = []
    for group in ("agent", "extra"):
        for key, value in raw_obs.get(group, {}).items():
            v = torch.as_tensor(value)
            layout.append((f"{group}/{key}", int(v[0].numel()) if v.ndim > 1 else 1))
    return tuple(layout)


def flat_state(raw_obs: dict) -> torch.Tensor:
    parts = []
    for group in ("agent", "extra"):
        for value in raw_obs.get(group, {}).values():
            v = torch.as_tensor(value)
            parts.append(v.reshape(v.shape[0], -1).float() if v.ndim > 1 else v.reshape(-1, 1).float())
    return torch.cat(parts, dim=1)


def camera_images(raw_obs: dict, image_size: int) -> dict[str, torch.Tensor]:
    """RGB uint8 [B, H, W, 3] per camera, area-resized to the policy's square resolution if needed."""
    out = {}
    for name, data in raw_obs.get("sensor_data", {}).items():
        rgb = torch.as_tensor(data["rgb"])
        if rgb.shape[1] != image_size or rgb.shape[2] != image_size:
            x = rgb.permute(0, 3, 1, 2).float()
            x = F.interpolate(x, size=(image_size, image_size), mode="area")
            rgb = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        out[name] = rgb.contiguous()
    return out


def adapt(raw_obs: dict, image_size: int, with_images: bool) -> Observation:
    obs: Observation = {"state": flat_state(raw_obs)}
    obs["images"] = camera_images(raw_obs, image_size) if with_images else {}
    return obs
