"""The expert-parallel MoE MLP layer, a DeepSpeed ``MoE``, and its batched experts.

At ep_size 1 there is nothing to exchange, and the layer does not enter DeepSpeed's ``MOELayer``: it
runs ``MoEMlp``'s dropless dispatch (moe/layer.dropless_moe) over the same expert modules, so no
capacity is read back to the host, no ``(E, C, D)`` buffer is padded to the busiest expert, and on
sm90+ GPUs in bf16 the experts are one ``grouped_mm``. Parameters, groups and checkpoint files are
DeepSpeed's either way (``local_dispatch = False`` takes DeepSpeed's path; its tests do).

At ep_size > 1 it is DeepSpeed's ``MOELayer`` with our gate (gate.py) and experts that are DeepSpeed
``Experts`` holding timm ``Mlp`` modules, as ``MLPExperts`` does, run batched; local expert ``i`` on
expert-parallel rank ``r`` is global expert ``r * E / ep_size + i``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from deepspeed.moe.experts import Experts
from deepspeed.moe.layer import MoE
from timm.layers import Mlp

from modsquad_ds.moe import kernels
from modsquad_ds.moe.ds_adapter.gate import TaskGate
from modsquad_ds.moe.experts import moe_mlp
from modsquad_ds.moe.layer import dropless_moe
from modsquad_ds.moe.router import TaskRouter
from modsquad_ds.moe.stats import RoutingStats, routing_stats


class BatchedExperts(kernels.KernelChoice, Experts):
    """DeepSpeed's ``Experts`` (same ``deepspeed_experts.{i}`` modules, names and group attributes),
    run as two batched matmuls over the local experts instead of a Python loop.

    ``MOELayer`` hands the experts an equal-capacity ``(ep_size, E_local, C, D)`` buffer, so every
    local expert sees the same number of rows: ``baddbmm`` over ``E_local`` does them all at once.
    Padded rows are zeros whose outputs are never read, so they add nothing to any gradient, exactly
    as in the loop. The loop (DeepSpeed's ``forward``) remains for experts that are not a plain
    two-layer timm ``Mlp`` (``batched = False`` forces it). ``kernel`` is the expert kernel of the
    layer's local path at ep_size 1 (:meth:`ExpertParallelMoEMlp.forward`).
    """

    def __init__(self, expert: nn.Module, num_local_experts: int = 1, expert_group_name: Optional[str] = None):
        super().__init__(expert, num_local_experts, expert_group_name)
        self.batched = isinstance(expert, Mlp) and isinstance(expert.norm, nn.Identity)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if not self.batched:
            return super().forward(inputs)
        ep, e, c, d = inputs.shape
        x_EMD = inputs.transpose(0, 1).reshape(e, ep * c, d)
        first = self.deepspeed_experts[0]
        h = _batched_linear(x_EMD, [m.fc1 for m in self.deepspeed_experts])
        h = first.norm(first.drop1(first.act(h)))
        y = first.drop2(_batched_linear(h, [m.fc2 for m in self.deepspeed_experts]))
        return y.view(e, ep, c, -1).transpose(0, 1)


def _batched_linear(x_EMI: torch.Tensor, linears: list[nn.Linear]) -> torch.Tensor:
    w_EIO = torch.stack([m.weight for m in linears]).transpose(1, 2)
    if linears[0].bias is None:
        return torch.bmm(x_EMI, w_EIO)
    return torch.baddbmm(torch.stack([m.bias for m in linears]).unsqueeze(1), x_EMI, w_EIO)


class ExpertParallelMoEMlp(MoE):
    """``MoEMlp`` on DeepSpeed's ``MoE``: same forward, experts sharded over ``ep_size`` ranks."""

    kind = "mlp"

    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int, num_tasks: int,
                 ep_size: int = 1, noisy: bool = True, noise_epsilon: float = 1e-2,
                 router: Optional[TaskRouter] = None):
        if top_k > num_experts:
            raise ValueError(f"top_k ({top_k}) must be <= num_experts ({num_experts})")
        # MoE builds DeepSpeed's Experts (deep copies of this Mlp, marked allreduce=False with the
        # group name ep_size_{ep_size}) and a TopKGate that we replace; k=1 only to build the latter.
        super().__init__(hidden_size=dim, expert=Mlp(dim, hidden, act_layer=nn.GELU), num_experts=num_experts,
                         ep_size=ep_size, k=1, drop_tokens=False, use_rts=False)
        self.top_k = top_k
        # the same modules and names as DeepSpeed's Experts, run batched (BatchedExperts)
        self.deepspeed_moe.experts = BatchedExperts(self.local_experts[0], self.num_local_experts,
                                                    self.expert_group_name)
        self.deepspeed_moe.gate = TaskGate(router or TaskRouter(dim, num_experts, top_k, num_tasks, noisy,
                                                                 noise_epsilon))
        self.name = "mlp"  # set by convert_to_expert_parallel to the module path
        self.local_dispatch = True
        """At ep_size 1, route with MoEMlp's dropless dispatch instead of DeepSpeed's MOELayer (same
        results, same modules and checkpoint files); False runs DeepSpeed's path (its tests)."""

    @property
    def router(self) -> TaskRouter:
        return self.deepspeed_moe.gate.router

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.deepspeed_moe.experts.deepspeed_experts

    @property
    def ep_group(self):
        """This layer's expert-parallel process group: the one DeepSpeed hands the layer in
        ``set_deepspeed_parallelism`` (None in one process), used instead of its private registry."""
        return self.deepspeed_moe.ep_group

    @property
    def ep_rank(self) -> int:
        if self.ep_size == 1:
            return 0
        if self.ep_group is None:
            raise RuntimeError("ExpertParallelMoEMlp with ep_size > 1: call set_deepspeed_parallelism first "
                               "(convert_to_expert_parallel does)")
        return dist.get_rank(group=self.ep_group)

    def global_expert_ids(self) -> list[int]:
        first = self.ep_rank * self.num_local_experts
        return list(range(first, first + self.num_local_experts))

    def forward(self, x_TBND: torch.Tensor, task_ids_T: torch.Tensor) -> tuple[torch.Tensor, RoutingStats]:
        if self.ep_size == 1 and self.local_dispatch:
            # Nothing to exchange: MoEMlp's dropless dispatch over the same expert modules (no
            # capacity, so no host sync for it and no padded (E, C, D) buffer; grouped_mm on sm90+).
            kernel = self.deepspeed_moe.experts.kernel
            return dropless_moe(self.router, lambda x_ND, p: moe_mlp(self.local_experts, x_ND, p, kernel),
                                self.num_local_experts, x_TBND, task_ids_T, self.name, self.kind)
        y_TBND, _, _ = super().forward(x_TBND, task_ids_T)
        r, self.deepspeed_moe.gate.routing = self.deepspeed_moe.gate.routing, None
        stats = routing_stats(self.name, self.kind, r.probs_TSE, r.topk_ids_TSK, task_ids_T.to(r.probs_TSE.device),
                              self.router.num_tasks)
        return y_TBND, stats
