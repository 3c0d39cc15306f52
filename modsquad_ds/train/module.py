"""What the DeepSpeed engine wraps: the model and the objective as one module.

The objective owns trainable parameters (the uncertainty task weights), so it belongs inside the
engine: DeepSpeed then optimises, averages and checkpoints them with everything else.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from modsquad_ds.model.objective import MultiTaskObjective, TableReducer
from modsquad_ds.model.vit import ModSquadViT
from modsquad_ds.moe.stats import RoutingStats


class TrainModule(nn.Module):
    def __init__(self, model: ModSquadViT, objective: MultiTaskObjective, reduce_table: TableReducer):
        super().__init__()
        self.model = model
        self.objective = objective
        self.reduce_table = reduce_table

    def forward(self, batch: Mapping) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[RoutingStats]]:
        dtype = next(self.model.parameters()).dtype  # bf16 engines cast the module, not the inputs
        out = self.model(batch["image"].to(dtype))
        loss, stats = self.objective(out, batch, self.reduce_table)
        return loss, stats, out.routing
