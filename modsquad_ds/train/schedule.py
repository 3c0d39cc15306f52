"""Learning-rate schedule: linear warm-up, then cosine decay to ``min_lr`` (paper Sec. 4.1)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, warmup: int, base_lr: float, min_lr: float) -> float:
    """The learning rate of optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def lr_lambda(total: int, warmup: int, base_lr: float, min_lr: float):
    """For torch's LambdaLR, whose multiplier scales the optimizer's base lr."""
    return lambda step: warmup_cosine(step, total, warmup, base_lr, min_lr) / base_lr
