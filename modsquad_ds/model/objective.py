"""The training objective (paper eq. 7): weighted task losses minus w_MI times the MI of every MoE
layer (or plus the load-balancing loss of the modified-MoE baseline).

``reduce_table`` is how the trainer makes the auxiliary loss global: it receives every layer's
task x expert table, flattened and concatenated into one vector, and returns that vector summed
over all data-parallel ranks (an autograd-aware all-reduce): one collective per micro step forward
and one backward, not one per MoE layer each way. The default, identity, is the single-process
objective. No communication happens here.

The losses of all layers whose tables have one shape (every attention layer, every MLP layer) are
computed as one stacked call: the same values, a twelfth of the launches at depth 12.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Mapping, Optional, Sequence

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


def reduce_together(tables: Sequence[torch.Tensor], reduce_table: TableReducer) -> list[torch.Tensor]:
    """Every table reduced by one ``reduce_table`` call on their concatenation (one collective)."""
    reduced = reduce_table(torch.cat([t.reshape(-1) for t in tables]))
    return [r.view_as(t) for r, t in zip(reduced.split([t.numel() for t in tables]), tables)]


def per_layer(loss_fn, *table_lists: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``loss_fn`` of every layer's tables, called once per table shape on that shape's stacked tables:
    the sum over layers, and each layer's value (detached) in layer order."""
    layers_by_shape = defaultdict(list)
    for i, table in enumerate(table_lists[0]):
        layers_by_shape[table.shape].append(i)
    total, values = 0.0, [None] * len(table_lists[0])
    for layers in layers_by_shape.values():
        losses = loss_fn(*(torch.stack([tables[i] for i in layers]) for tables in table_lists))
        total = total + losses.sum()
        for i, value in zip(layers, losses.detach()):
            values[i] = value
    return total, values


class MultiTaskObjective(nn.Module):
    def __init__(self, cfg: RunConfig):
        super().__init__()
        names = cfg.tasks.names
        self.loss_cfg = cfg.loss
        self.weighting = (UncertaintyWeighting(names) if cfg.loss.task_weighting == "uncertainty"
                          else FixedWeighting(names, cfg.loss.task_weights))

    def no_weight_decay(self) -> set[str]:
        """The learned task weights' log variances: decay would pull every task's weight towards 1/2
        (timm's hook, as the model's)."""
        return {f"weighting.{n}" for n, _ in self.weighting.named_parameters()}

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
        routing = out.routing
        if cfg.aux == "mi":
            use_gates = cfg.mi_table == "topk_gates"
            tables = reduce_together([r.gate_table_TE if use_gates and r.gate_table_TE is not None
                                      else r.prob_table_TE for r in routing], reduce_table)
            mi, per_layer_mi = per_layer(mutual_information, tables)
            total = total - cfg.w_mi * mi
            stats.update({f"mi/{r.layer}": v for r, v in zip(routing, per_layer_mi)})
        else:
            tables = reduce_together([r.prob_table_TE for r in routing] + [r.count_table_TE for r in routing],
                                     reduce_table)
            balance, per_layer_balance = per_layer(load_balancing_loss, tables[:len(routing)], tables[len(routing):])
            total = total + cfg.w_balance * balance
            stats.update({f"balance/{r.layer}": v for r, v in zip(routing, per_layer_balance)})
        return total, stats

    def forward(self, out: ModelOutput, batch: Mapping, reduce_table: Optional[TableReducer] = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        losses = self.task_losses(out, batch)
        aux, stats = self.aux_loss(out, reduce_table or _identity)
        total = self.weighting(losses) + aux
        stats.update({f"loss/{name}": loss.detach() for name, loss in losses.items()})
        stats.update({f"weight/{name}": w for name, w in self.weighting.weights().items() if name in losses})
        stats["loss/aux"] = aux.detach()
        stats["loss/total"] = total.detach()
        return total, stats
