"""What an MoE layer reports about its routing: the inputs of the MI / balance losses and usage maps.

Tables are indexed by *global* task id (rows) and expert id (columns), so they can be summed across
ranks and steps. ``prob_table`` carries gradient; the counts do not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class RoutingStats:
    layer: str
    """Module path of the MoE layer, e.g. ``blocks.1.mlp``."""
    kind: str
    """``attn`` or ``mlp``."""
    prob_table_TE: torch.Tensor
    """Sum over tokens of the soft routing probabilities, per task and expert (float32, with grad)."""
    count_table_TE: torch.Tensor
    """Number of top-k selections per task and expert (float32, no grad)."""
    tokens_T: torch.Tensor
    """Tokens routed per task (float32, no grad)."""
    top_k: int
    gate_table_TE: Optional[torch.Tensor] = None
    """Sum over tokens of the top-k gate values only (the paper's G(x), zero outside the top-k), per
    task and expert (float32, with grad): the MI table of ``loss.mi_table: topk_gates``."""


def routing_stats(layer: str, kind: str, probs_TSE: torch.Tensor, topk_ids_TSK: torch.Tensor,
                  task_ids_T: torch.Tensor, num_tasks: int) -> RoutingStats:
    """The layer's tables from its routing of ``T`` task slots, summed into rows by global task id.

    The three per-slot sums (probabilities, top-k gates, top-k counts) are stacked and mapped to
    task rows by one ``index_add``: a dozen small kernels per layer, where a GPU step is bound by
    how fast the host issues them (benchmarks/host_overhead.py).
    """
    t, s, e = probs_TSE.shape
    k = topk_ids_TSK.shape[-1]
    chosen_TSE = torch.zeros_like(probs_TSE).scatter_(2, topk_ids_TSK, 1.0)  # the top-k mask (no grad)
    rows_3TE = torch.stack((probs_TSE.sum(dim=1), (probs_TSE * chosen_TSE).sum(dim=1), chosen_TSE.sum(dim=1)))
    tables = rows_3TE.new_zeros(3, num_tasks, e).index_add(1, task_ids_T, rows_3TE)
    prob_table, gate_table, counts = tables.unbind(0)
    count_table = counts.detach()
    tokens = count_table.sum(dim=1) / k  # every token makes exactly k choices
    return RoutingStats(layer, kind, prob_table, count_table, tokens, k, gate_table)
