"""The MoE MLP layer: route -> dispatch -> experts -> combine, for a task-batched input.

Input rows are grouped by task: ``x_TBND`` holds T task slots of B images of N tokens, and
``task_ids_T`` says which task each slot is. Each slot's tokens are routed by that task's router
(paper eq. 4); the experts themselves are shared by all tasks.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from modsquad_ds.moe import dispatch as dsp
from modsquad_ds.moe.experts import MLPExperts
from modsquad_ds.moe.router import TaskRouter
from modsquad_ds.moe.stats import RoutingStats, routing_stats

RunExperts = Callable[[torch.Tensor, dsp.DispatchPlan], torch.Tensor]
"""``(x_ND tokens, plan) -> y_ND``: the experts of a layer on the tokens the plan sends them, each
token's outputs summed by gate (dispatch, experts, combine)."""


def dropless_moe(router: TaskRouter, run_experts: RunExperts, num_experts: int, x_TBND: torch.Tensor,
                 task_ids_T: torch.Tensor, name: str, kind: str) -> tuple[torch.Tensor, RoutingStats]:
    """Route each task slot's tokens by its task's router, run the ``num_experts`` experts on every
    chosen (token, expert) pair, nothing dropped or padded, and combine by gate. (A pruned layer's
    router scores more experts than the layer runs: the count is the layer's, not the router's.)"""
    t, b, n, d = x_TBND.shape
    x_TSD = x_TBND.reshape(t, b * n, d)
    r = router(x_TSD, task_ids_T)
    p = dsp.plan(r.topk_ids_TSK.reshape(t * b * n, -1), r.gates_TSK.reshape(t * b * n, -1), num_experts)
    y = run_experts(x_TSD.reshape(-1, d), p).view(t, b, n, d)
    return y, routing_stats(name, kind, r.probs_TSE, r.topk_ids_TSK, task_ids_T, router.num_tasks)


class MoEMlp(nn.Module):
    kind = "mlp"

    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int, num_tasks: int,
                 noisy: bool = True, noise_epsilon: float = 1e-2):
        super().__init__()
        self.num_experts = num_experts
        self.router = TaskRouter(dim, num_experts, top_k, num_tasks, noisy, noise_epsilon)
        self.experts = MLPExperts(dim, hidden, num_experts)
        self.name = "mlp"  # replaced by the model with the module path

    def forward(self, x_TBND: torch.Tensor, task_ids_T: torch.Tensor) -> tuple[torch.Tensor, RoutingStats]:
        return dropless_moe(self.router, self.experts, self.num_experts, x_TBND, task_ids_T, self.name, self.kind)
