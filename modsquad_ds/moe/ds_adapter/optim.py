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
def clip_grad_norm_(module: nn.Module, max_norm: float, eps: float = 1e-6) -> torch.Tensor:
    """Global L2 gradient norm of an expert-parallel model, and clip to ``max_norm`` (0: measure only).

    For ZeRO stage 0, where DeepSpeed 0.19.8's own clipping (``runtime.utils.clip_grad_norm_``) averages
    the per-rank norms over the data-parallel group: each rank's norm holds only its own experts, so
    with ``ep_size > 1`` the clip norm misses the other ranks' experts (ZeRO 1/2 sum the partitioned
    norms over all ranks and are right; tests/distributed/test_ep_equivalence.py checks both). Use it with
    ``gradient_clipping: 0`` in the DeepSpeed config, after ``engine.backward`` (grads are reduced
    there) and before ``engine.step``. A collective: every rank must call it.
    """
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    # Squared norms summed on the gradients' device: one host sync for the whole model (the
    # ``float(total)`` below), not one ``.cpu()`` per parameter.
    device = grads[0].device
    dense_sq = torch.zeros((), dtype=torch.float64, device=device)
    expert_sq: dict[str, torch.Tensor] = {}
    for p in module.parameters():
        if p.grad is None:
            continue
        sq = p.grad.detach().double().pow(2).sum().to(device)
        if is_moe_param(p):
            expert_sq[p.group_name] = expert_sq.get(p.group_name, torch.zeros_like(dense_sq)) + sq
        else:
            dense_sq += sq
    total_sq = dense_sq
    ep_groups = {layer.expert_group_name: layer.ep_group for _, layer in expert_parallel_layers(module)}
    for group_name in sorted(expert_sq):
        # after DeepSpeed's reduction an expert's gradient is identical on its expert-data-parallel
        # replicas; the ranks of one expert-parallel group hold different experts: sum over those.
        part = expert_sq[group_name]
        if ep_groups.get(group_name) is not None:  # None in one process
            dist.all_reduce(part, group=ep_groups[group_name])
        total_sq = total_sq + part
    total = total_sq.sqrt().float()
    if max_norm > 0:
        coef = min(1.0, float(max_norm) / (float(total) + eps))
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
    return total
