"""Export: read DeepSpeed checkpoints of any layout, prune per task, write standalone models."""
