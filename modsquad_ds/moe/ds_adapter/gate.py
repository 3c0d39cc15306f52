"""The gate DeepSpeed's ``MOELayer`` calls at ep_size > 1: our per-task router, dropless.

What is ours inside ``MOELayer`` (gate -> sparse encode -> all-to-all -> experts -> all-to-all ->
sparse decode):

- the gate, :class:`TaskGate`, wraps our per-task :class:`~modsquad_ds.moe.router.TaskRouter` (the same
  module, same math, same noise draw as ``MoEMlp``) and answers the 0.19.4+ gate contract
  ``gate(reshaped_input, used_token, sparse_routes, use_tutel) -> (l_aux, capacity, num_experts,
  indices[k,S], locations[k,S], gates[k,S], exp_counts)``. ``MOELayer`` hands its second input to the
  gate untouched and uses it nowhere else; we pass ``task_ids_T`` there, and the gate reads the token
  rows as ``T`` task slots of equal length (the task-major layout of ``x_TBND``).
- dropless capacity. DeepSpeed's all-to-all exchanges an ``(E, C, D)`` buffer of the same shape on every
  rank of the expert-parallel group, so ``C`` must be equal across the group. We take ``C`` = the
  largest per-expert token count on any rank of the group (one scalar all-reduce MAX per layer
  call, DeepSpeed's own ``drop_tokens=False`` rule), the smallest capacity that drops nothing.
  ``C = S`` (all local tokens) would need no communication but would run the experts on
  ``E * S`` rows instead of about ``k * S``: 4x the expert FLOPs for 8 experts top-2 or 16 top-4.
  Nothing is ever dropped, whatever the ranks' token counts, so results equal the single-process
  ``MoEMlp`` to float32 rounding (the padded rows are zeros whose outputs are never read and add
  nothing to the expert gradients).
- ``l_aux`` is 0: the MI / balance losses come from the layer's ``RoutingStats``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from modsquad_ds.moe.dispatch import sort_by_expert
from modsquad_ds.moe.router import RoutingResult, TaskRouter


class TaskGate(nn.Module):
    """DeepSpeed gate (0.19.4+ contract) that routes each token by its task's router, dropless.

    Holds the :class:`TaskRouter` as ``router`` (parameters ``task_wg`` / ``task_wnoise``: no
    "expert" in their names, which DeepSpeed's checkpointing would take for expert weights).
    The last routing is kept in ``routing`` until the layer pops it for its ``RoutingStats``.
    """

    def __init__(self, router: TaskRouter):
        super().__init__()
        self.router = router
        self.num_experts = router.num_experts
        self.k = router.top_k
        self.ep_group = None
        self.routing: Optional[RoutingResult] = None

    def _set_ep_group(self, ep_group) -> None:
        # DeepSpeed's TopKGate asserts it is set once; the engine sets it again after
        # convert_to_expert_parallel has (with the same group), and a second engine again.
        self.ep_group = ep_group

    def forward(self, reshaped_input: torch.Tensor, used_token: Optional[torch.Tensor] = None,
                sparse_routes: bool = True, use_tutel: bool = False):
        if used_token is None or used_token.dim() != 1 or used_token.dtype not in (torch.int64, torch.int32):
            raise ValueError("TaskGate needs the task id of every task slot (task_ids_T, a 1-D integer "
                             "tensor) as MOELayer's second input; call ExpertParallelMoEMlp(x_TBND, task_ids_T)")
        if not sparse_routes or use_tutel:
            raise NotImplementedError("TaskGate implements the sparse-route gate contract of DeepSpeed 0.19.4+ only")
        task_ids_T = used_token.long()
        s_total, d = reshaped_input.shape
        t = task_ids_T.numel()
        if s_total % t:
            raise ValueError(f"{s_total} tokens do not split into {t} equal task slots")
        r = self.router(reshaped_input.view(t, s_total // t, d), task_ids_T)
        self.routing = r
        e, k = self.num_experts, self.k
        ids_SK = r.topk_ids_TSK.reshape(s_total, k)
        gates_SK = r.gates_TSK.reshape(s_total, k)
        locations_SK, counts_E = _locations(ids_SK, e)
        capacity = counts_E.max()  # tokens pick distinct experts, so this is at most S
        if self.ep_group is not None and dist.get_world_size(self.ep_group) > 1:
            dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=self.ep_group)
        l_aux = reshaped_input.new_zeros((), dtype=torch.float32)
        return (l_aux, capacity, e, ids_SK.t().to(torch.int32).contiguous(),
                locations_SK.t().to(torch.int32).contiguous(), gates_SK.t().contiguous(), counts_E)


def _locations(ids_SK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Position of each (token, choice) among its expert's slots, in token order; and the counts.

    The dispatch plan's stable sort by expert (moe/dispatch.py) instead of DeepSpeed's ``cumsum`` over
    a one-hot ``(S*K, E)`` mask: O(S K log) memory-light, same result, no host sync.
    """
    flat = ids_SK.reshape(-1)
    order, counts = sort_by_expert(flat, num_experts)
    starts = torch.cumsum(counts, 0) - counts
    pos_sorted = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    locations = torch.empty_like(flat)
    locations[order] = pos_sorted
    return locations.view_as(ids_SK), counts
