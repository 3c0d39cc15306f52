"""Dropless token dispatch: permute token copies so each expert's tokens are contiguous.

Not a module: ``plan`` sorts the ``N*K`` (token, choice) slots by expert once per layer, then
``dispatch`` gathers inputs in that order and ``combine`` scatters the gate-weighted outputs back.
Nothing is dropped and nothing is padded, so the result equals the dense sum of paper eq. 1.
Expert-parallel communication (DeepSpeed's all-to-all) lives in ``ds_adapter``, not here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DispatchPlan:
    slot_order: torch.Tensor
    """(N*K,) slot ids (token * K + choice) sorted by expert id (stable)."""
    token_idx: torch.Tensor
    """(N*K,) source token of each sorted slot."""
    gates: torch.Tensor
    """(N*K,) gate of each sorted slot."""
    counts: list[int]
    """Slots per expert, in expert order; sums to N*K."""
    num_tokens: int


def plan(topk_ids_NK: torch.Tensor, gates_NK: torch.Tensor, num_experts: int) -> DispatchPlan:
    num_tokens, k = topk_ids_NK.shape
    flat_ids = topk_ids_NK.reshape(-1)
    slot_order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    return DispatchPlan(slot_order, slot_order // k, gates_NK.reshape(-1)[slot_order], counts, num_tokens)


def dispatch(x_ND: torch.Tensor, p: DispatchPlan) -> torch.Tensor:
    """(N, D) tokens -> (N*K, D) copies sorted by expert."""
    return x_ND.index_select(0, p.token_idx)


def unpermute(y_SD: torch.Tensor, p: DispatchPlan) -> torch.Tensor:
    """(N*K, D) expert-sorted rows -> (N, K, D) in slot order, without weighting."""
    inverse = torch.empty_like(p.slot_order)
    inverse[p.slot_order] = torch.arange(p.slot_order.numel(), device=p.slot_order.device)
    return y_SD.index_select(0, inverse).view(p.num_tokens, -1, y_SD.shape[-1])


def combine(y_SD: torch.Tensor, p: DispatchPlan) -> torch.Tensor:
    """(N*K, D) expert outputs -> (N, D) gate-weighted sums per token."""
    weighted = y_SD * p.gates.to(y_SD.dtype).unsqueeze(-1)
    out = torch.zeros(p.num_tokens, y_SD.shape[-1], dtype=y_SD.dtype, device=y_SD.device)
    return out.index_add(0, p.token_idx, weighted)
