"""Auxiliary routing losses: pure functions of task x expert tables (no communication here).

To make a loss global, sum the tables across ranks *before* calling these (an explicit, autograd-
aware all-reduce in the trainer): MI is not additive over shards of a batch, the table is.
"""

from __future__ import annotations

import torch

_TINY = 1e-12


def mutual_information(prob_table_TE: torch.Tensor) -> torch.Tensor:
    """I(T;E) of paper eq. 5 with P(T,E) = table / total (nats), over the last two dims.

    0 when every task uses the experts alike; log T when each task owns its own experts. Empty rows
    (tasks absent from the batch) and empty columns contribute nothing. A stack of tables
    ``(..., T, E)`` gives one MI per table, in one pass (the objective's every layer at once).
    """
    table = prob_table_TE.float()
    p_TE = table / table.sum(dim=(-2, -1), keepdim=True).clamp_min(_TINY)
    p_T = p_TE.sum(dim=-1, keepdim=True)
    p_E = p_TE.sum(dim=-2, keepdim=True)
    ratio = p_TE.clamp_min(_TINY) / (p_T * p_E).clamp_min(_TINY)
    return (p_TE * ratio.log()).sum(dim=(-2, -1))


def load_balancing_loss(prob_table_TE: torch.Tensor, count_table_TE: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer balance loss over all tasks together (the paper's modified-MoE baseline).

    ``E * sum_e f_e * p_e`` with f_e the share of top-k selections and p_e the mean routing
    probability of expert e; it is 1 when both are uniform and grows as routing concentrates.
    Over the last two dims, like :func:`mutual_information`.
    """
    probs_E = prob_table_TE.float().sum(dim=-2)
    counts_E = count_table_TE.float().sum(dim=-2)
    num_experts = probs_E.shape[-1]
    share_E = counts_E / counts_E.sum(dim=-1, keepdim=True).clamp_min(_TINY)
    mean_prob_E = probs_E / probs_E.sum(dim=-1, keepdim=True).clamp_min(_TINY)
    return num_experts * (share_E * mean_prob_E).sum(dim=-1)
