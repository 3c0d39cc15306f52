"""What a forward pass returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from modsquad_ds.moe.stats import RoutingStats


@dataclass
class ModelOutput:
    preds: dict[str, torch.Tensor]
    """Prediction per task, in the order of the forward's task ids."""
    routing: list[RoutingStats] = field(default_factory=list)
    """One entry per MoE layer, in forward order."""
