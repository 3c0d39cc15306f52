"""Per-task noisy top-k routing (paper eqs. 2 and 4).

Every MoE layer holds one router per task. Their weights are stacked into ``(num_tasks, D, E)``
tensors so that all tasks of a task-batched forward route in a single ``bmm``, and so that every
task's router is touched by every call in the same order (ZeRO-2 corrupts gradients otherwise; see
the field notes). The gate math runs in float32 whatever the activation dtype: the MI loss takes
logs of these probabilities.

Parameter names avoid the word "expert": DeepSpeed's checkpointing treats any parameter whose name
contains it, inside an MoE module, as an expert weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from modsquad_ds.moe.amp import autocast_available


@dataclass
class RoutingResult:
    """Routing of ``T`` task slots of ``S`` tokens each to ``E`` experts, ``K`` per token."""

    logits_TSE: torch.Tensor
    probs_TSE: torch.Tensor
    """Softmax over all experts (the P(E|x) of the MI loss); not only the top-k."""
    topk_ids_TSK: torch.Tensor
    gates_TSK: torch.Tensor
    """probs at the top-k experts, not renormalised (paper eq. 2, reference code)."""


class TaskRouter(nn.Module):
    noise_at_eval = False
    """Noise in evaluation too (``moe.eval_noise``, the authors' behaviour); set by the model."""

    def __init__(self, dim: int, num_experts: int, top_k: int, num_tasks: int,
                 noisy: bool = True, noise_epsilon: float = 1e-2):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.noise_epsilon = noise_epsilon
        self.task_wg = nn.Parameter(torch.empty(num_tasks, dim, num_experts))
        self.task_wnoise = nn.Parameter(torch.empty(num_tasks, dim, num_experts)) if noisy else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # As timm initialises the reference code's per-task nn.Linear gates.
        trunc_normal_(self.task_wg, std=0.02)
        if self.task_wnoise is not None:
            trunc_normal_(self.task_wnoise, std=0.02)

    @property
    def num_tasks(self) -> int:
        return self.task_wg.shape[0]

    def forward(self, x_TSD: torch.Tensor, task_ids_T: torch.Tensor) -> RoutingResult:
        # fp32 under autocast too: autocast would run these bmm in bf16
        device_type = x_TSD.device.type
        if not autocast_available(device_type):  # e.g. "meta" (tests/unit/train/test_no_host_sync.py)
            return self._route(x_TSD, task_ids_T)
        with torch.autocast(device_type, enabled=False):
            return self._route(x_TSD, task_ids_T)

    def _route(self, x_TSD: torch.Tensor, task_ids_T: torch.Tensor) -> RoutingResult:
        x = x_TSD.float()
        if self.task_wnoise is not None and (self.training or self.noise_at_eval):
            # gate and noise projections in one bmm: one pass over the tokens, one launch
            both = torch.bmm(x, torch.cat((self.task_wg, self.task_wnoise), dim=2)[task_ids_T].float())
            logits, noise_logits = both.split(self.num_experts, dim=2)
            logits = logits + torch.randn_like(logits) * (F.softplus(noise_logits) + self.noise_epsilon)
        else:
            logits = torch.bmm(x, self.task_wg[task_ids_T].float())
        probs = logits.softmax(dim=-1)
        gates, topk_ids = probs.topk(self.top_k, dim=-1)
        return RoutingResult(logits, probs, topk_ids, gates)
