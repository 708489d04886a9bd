"""RL fine-tuning of the flow VLA: stochastic samplers with exact chain log-probs, PPO and GRPO."""
