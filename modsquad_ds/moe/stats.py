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
    t, s, e = probs_TSE.shape
    prob_rows = probs_TSE.sum(dim=1)
    prob_table = prob_rows.new_zeros(num_tasks, e).index_add(0, task_ids_T, prob_rows)
    gate_rows = torch.zeros_like(probs_TSE).scatter(2, topk_ids_TSK, probs_TSE.gather(2, topk_ids_TSK)).sum(dim=1)
    gate_table = gate_rows.new_zeros(num_tasks, e).index_add(0, task_ids_T, gate_rows)
    with torch.no_grad():
        one_hot_counts = torch.zeros(t, e, device=probs_TSE.device)
        one_hot_counts.scatter_add_(1, topk_ids_TSK.reshape(t, -1),
                                    torch.ones(t, topk_ids_TSK[0].numel(), device=probs_TSE.device))
        count_table = one_hot_counts.new_zeros(num_tasks, e).index_add(0, task_ids_T, one_hot_counts)
        tokens = one_hot_counts.new_zeros(num_tasks).index_add(
            0, task_ids_T, torch.full((t,), float(s), device=probs_TSE.device))
    return RoutingStats(layer, kind, prob_table, count_table, tokens, topk_ids_TSK.shape[-1], gate_table)
