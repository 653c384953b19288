"""Training loop, data, optimizers, checkpoints and logging for the GPT ablation framework."""
