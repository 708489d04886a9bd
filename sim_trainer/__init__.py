"""Simulation side: ManiSkill envs, demonstrations, the flow VLA model, SFT, RL, evaluation, export."""
