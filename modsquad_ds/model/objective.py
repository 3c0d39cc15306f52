"""The training objective (paper eq. 7): weighted task losses minus w_MI times the MI of every MoE
layer (or plus the load-balancing loss of the modified-MoE baseline).

``reduce_table`` is how the trainer makes the auxiliary loss global: it receives each layer's
task x expert table and returns the table summed over all data-parallel ranks (an autograd-aware
all-reduce). The default, identity, is the single-process objective. No communication happens here.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
import torch.nn as nn

from modsquad_ds.config.schema import RunConfig
from modsquad_ds.data.tasks import get_task
from modsquad_ds.model.output import ModelOutput
from modsquad_ds.model.task_losses import task_loss
from modsquad_ds.model.weighting import FixedWeighting, UncertaintyWeighting
from modsquad_ds.moe.losses import load_balancing_loss, mutual_information

TableReducer = Callable[[torch.Tensor], torch.Tensor]


def _identity(table: torch.Tensor) -> torch.Tensor:
    return table


class MultiTaskObjective(nn.Module):
    def __init__(self, cfg: RunConfig):
        super().__init__()
        names = cfg.tasks.names
        self.loss_cfg = cfg.loss
        self.weighting = (UncertaintyWeighting(names) if cfg.loss.task_weighting == "uncertainty"
                          else FixedWeighting(names, cfg.loss.task_weights))

    def task_losses(self, out: ModelOutput, batch: Mapping) -> dict[str, torch.Tensor]:
        masks = batch.get("masks", {})
        return {name: task_loss(get_task(name).loss, pred, batch["targets"][name], masks.get(name))
                for name, pred in out.preds.items()}

    def aux_loss(self, out: ModelOutput, reduce_table: TableReducer = _identity
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg, stats = self.loss_cfg, {}
        # on the predictions' device: a CPU zero would put "loss/aux" on the CPU while every other
        # logged statistic is on the GPU, and the trainer stacks them into one tensor
        total = torch.zeros((), device=next((p.device for p in out.preds.values()), None))
        if cfg.aux == "none" or not out.routing:
            return total, stats
        for r in out.routing:
            use_gates = cfg.mi_table == "topk_gates" and cfg.aux == "mi" and r.gate_table_TE is not None
            table = reduce_table(r.gate_table_TE if use_gates else r.prob_table_TE)
            if cfg.aux == "mi":
                mi = mutual_information(table)
                stats[f"mi/{r.layer}"] = mi.detach()
                total = total - cfg.w_mi * mi
            else:
                counts = reduce_table(r.count_table_TE)
                balance = load_balancing_loss(table, counts)
                stats[f"balance/{r.layer}"] = balance.detach()
                total = total + cfg.w_balance * balance
        return total, stats

    def forward(self, out: ModelOutput, batch: Mapping, reduce_table: Optional[TableReducer] = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        losses = self.task_losses(out, batch)
        aux, stats = self.aux_loss(out, reduce_table or _identity)
        total = self.weighting(losses) + aux
        stats.update({f"loss/{name}": loss.detach() for name, loss in losses.items()})
        stats["loss/aux"] = aux.detach()
        stats["loss/total"] = total.detach()
        return total, stats
