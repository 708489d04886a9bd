"""The flow-matching VLA (pi0-shaped): prefix encoder, action expert, flow sampler, checkpoints."""
