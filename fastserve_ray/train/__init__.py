"""Data-parallel training on Ray Train: the per-worker loop, the TorchTrainer builder, checkpoints."""
