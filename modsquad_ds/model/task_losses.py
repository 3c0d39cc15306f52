"""Per-task losses (paper Sec. 4.1): pure functions of prediction, target and validity mask.

Every loss averages over valid elements only; a batch with no valid pixel contributes 0 (and a
zero gradient) rather than NaN.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F


def _masked_mean(err_BCHW: torch.Tensor, mask_B1HW: Optional[torch.Tensor]) -> torch.Tensor:
    if mask_B1HW is None:
        return err_BCHW.mean()
    weight = mask_B1HW.to(err_BCHW.dtype).expand_as(err_BCHW)
    return (err_BCHW * weight).sum() / weight.sum().clamp_min(1.0)


def l1_loss(pred, target, mask=None):
    return _masked_mean((pred - target).abs(), mask)


def l2_loss(pred, target, mask=None):
    return _masked_mean((pred - target).square(), mask)


def cosine_loss(pred, target, mask=None):
    """1 - cosine similarity of the L2-normalised predicted and true normals, per pixel."""
    cos = F.cosine_similarity(pred, target, dim=1, eps=1e-8).unsqueeze(1)
    return _masked_mean(1.0 - cos, mask)


def soft_cross_entropy(logits_BC, target_BC, mask=None):
    """Cross-entropy against a probability vector (Taskonomy's class files are soft labels)."""
    return -(target_BC * F.log_softmax(logits_BC.float(), dim=-1)).sum(-1).mean()


def pixel_cross_entropy(logits_BCHW, target_BHW, mask=None):
    err = F.cross_entropy(logits_BCHW.float(), target_BHW.long(), reduction="none").unsqueeze(1)
    return _masked_mean(err, mask)


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "l1": l1_loss,
    "l2": l2_loss,
    "cosine": cosine_loss,
    "ce_soft": soft_cross_entropy,
    "pixel_ce": pixel_cross_entropy,
}


def task_loss(loss_name: str, pred, target, mask=None) -> torch.Tensor:
    return LOSSES[loss_name](pred, target, mask)
