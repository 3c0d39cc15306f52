"""What the DeepSpeed engine wraps: the model and the objective as one module.

The objective owns trainable parameters (the uncertainty task weights), so it belongs inside the
engine: DeepSpeed then optimises, averages and checkpoints them with everything else.

The loader yields CPU tensors (pinned when CUDA is present, data/loader.py); ``forward`` copies the
whole batch (images, targets, masks) to the device the parameters live on, which is the engine's
device (DeepSpeed moves the module to ``get_accelerator().device(local_rank)``). Copies from pinned
memory are ``non_blocking``: the host goes on issuing work while the copy runs.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn

from modsquad_ds.model.objective import MultiTaskObjective, TableReducer
from modsquad_ds.model.vit import ModSquadViT
from modsquad_ds.moe.stats import RoutingStats


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor (in nested dicts, lists, tuples) on ``device``; other values kept."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=batch.is_pinned()) if batch.device != device else batch
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class TrainModule(nn.Module):
    def __init__(self, model: ModSquadViT, objective: MultiTaskObjective, reduce_table: TableReducer):
        super().__init__()
        self.model = model
        self.objective = objective
        self.reduce_table = reduce_table

    def no_weight_decay(self) -> set[str]:
        """Names (of this module's parameters) that AdamW must not decay: the model's and the objective's."""
        return ({f"model.{n}" for n in self.model.no_weight_decay()}
                | {f"objective.{n}" for n in self.objective.no_weight_decay()})

    def forward(self, batch: Mapping) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[RoutingStats]]:
        weight = next(self.model.parameters())
        batch = to_device(batch, weight.device)
        out = self.model(batch["image"].to(weight.dtype))  # bf16 engines cast the module, not the inputs
        loss, stats = self.objective(out, batch, self.reduce_table)
        return loss, stats, out.routing
