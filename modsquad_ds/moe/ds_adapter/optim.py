"""What DeepSpeed's optimizer needs of an MoE model: parameter groups, and correct gradient clipping."""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer

from modsquad_ds.moe.ds_adapter.convert import expert_parallel_layers


def moe_param_groups(model: nn.Module, weight_decay: float = 0.0,
                     no_decay: Optional[Iterable[str]] = None) -> list[dict]:
    """Optimizer parameter groups DeepSpeed's MoE support requires (ZeRO 1/2 assert on them): dense and
    expert parameters in separate groups, experts marked ``moe=True`` with their group name.

    Without ``no_decay`` every parameter gets ``weight_decay``; otherwise parameters whose name ends with
    one of ``no_decay`` or that are 1-D (biases, norms) get none."""
    decay, skip = [], []
    suffixes = tuple(no_decay or ())
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if no_decay is not None and (p.ndim <= 1 or name.endswith(suffixes)):
            skip.append(p)
        else:
            decay.append(p)
    param_groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay}]
    if skip:
        param_groups.append({"name": "no_decay", "params": skip, "weight_decay": 0.0})
    return split_params_into_different_moe_groups_for_optimizer(param_groups)


def is_expert_param(p: torch.Tensor) -> bool:
    return is_moe_param(p)


@torch.no_grad()
def clip_grad_norm_(module: nn.Module, max_norm: float) -> torch.Tensor:
    """Global L2 gradient norm of an expert-parallel model, and clip to ``max_norm`` (0: measure only).

    For ZeRO stage 0, where DeepSpeed 0.19.8's own clipping (``runtime.utils.clip_grad_norm_``) averages
    the per-rank norms over the data-parallel group: each rank's norm holds only its own experts, so
    with ``ep_size > 1`` the clip norm misses the other ranks' experts (ZeRO 1/2 sum the partitioned
    norms over all ranks and are right; tests/distributed/test_ep_equivalence.py checks both). Use it with
    ``gradient_clipping: 0`` in the DeepSpeed config, after ``engine.backward`` (grads are reduced
    there) and before ``engine.step``. A collective: every rank must call it.

    Nothing waits for the device: the norms are fused per parameter group (``_foreach_norm``, in fp32
    whatever the gradients' dtype), and the gradients are scaled by ``min(1, max_norm / (norm + 1e-6))``
    computed where they are (torch's ``clip_grads_with_norm_``), as torch's own clipping does. One
    kernel per parameter or a ``float()`` of the norm would stall a GPU step that the host already
    struggles to keep fed.
    """
    dense: list[nn.Parameter] = []
    experts: dict[str, list[nn.Parameter]] = {}
    for p in module.parameters():
        if p.grad is not None:
            (experts.setdefault(p.group_name, []) if is_moe_param(p) else dense).append(p)
    params = dense + [p for group in experts.values() for p in group]
    if not params:
        return torch.zeros(())
    total_sq = _squared_norm(dense, params[0].grad.device)
    ep_groups = {layer.expert_group_name: layer.ep_group for _, layer in expert_parallel_layers(module)}
    for group_name in sorted(experts):
        # after DeepSpeed's reduction an expert's gradient is identical on its expert-data-parallel
        # replicas; the ranks of one expert-parallel group hold different experts: sum over those.
        part = _squared_norm(experts[group_name], total_sq.device)
        if ep_groups.get(group_name) is not None:  # None in one process
            dist.all_reduce(part, group=ep_groups[group_name])
        total_sq = total_sq + part
    total = total_sq.sqrt().float()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def _squared_norm(params: list[nn.Parameter], device: torch.device) -> torch.Tensor:
    """Sum of the squared gradients of ``params``, in float64 on ``device`` (0 for none)."""
    if not params:
        return torch.zeros((), dtype=torch.float64, device=device)
    norms = torch._foreach_norm([p.grad for p in params], 2.0, dtype=torch.float32)
    return torch.stack(norms).double().square().sum()
