"""Training: which parameters train (tuning), batching order (sampler), checkpoints, and the recipe runner."""
