"""Swap a model's ``MoEMlp`` layers for expert-parallel ones (each rank keeps its experts) and back."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from modsquad_ds.moe.ds_adapter.layer import ExpertParallelMoEMlp
from modsquad_ds.moe.layer import MoEMlp


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule at ``path`` (a dotted module path) is."""
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, new)


def expert_parallel_layers(model: nn.Module) -> list[tuple[str, ExpertParallelMoEMlp]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ExpertParallelMoEMlp)]


def convert_to_expert_parallel(model: nn.Module, ep_size: int = 1,
                               use_data_before_expert_parallel: bool = False) -> nn.Module:
    """Swap every :class:`MoEMlp` of ``model`` (in place) for an :class:`ExpertParallelMoEMlp`.

    Each rank keeps the weights of the global experts it owns and shares the router module, so a model
    built with the same seed on every rank becomes, over the expert-parallel group, exactly the
    single-process model. ``ep_size > 1`` needs ``deepspeed.init_distributed`` first: the expert groups
    are created here (as the engine would, ``use_data_before_expert_parallel`` as in the DeepSpeed
    config) to know which experts this rank owns. Call before building the optimizer and engine.
    """
    if ep_size < 1:
        raise ValueError(f"ep_size must be >= 1, got {ep_size}")
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if ep_size > 1 and world == 1:
        raise ValueError(f"ep_size {ep_size} needs a process group of at least {ep_size} ranks "
                         "(call deepspeed.init_distributed first)")
    if world % ep_size:
        raise ValueError(f"ep_size ({ep_size}) must divide the world size ({world})")
    for path, old in [(n, m) for n, m in model.named_modules() if isinstance(m, MoEMlp)]:
        experts = old.experts.experts
        if len(experts) % ep_size:
            raise ValueError(f"ep_size ({ep_size}) must divide the number of experts of {path} ({len(experts)})")
        fc1 = experts[0].fc1
        new = ExpertParallelMoEMlp(fc1.in_features, fc1.out_features, len(experts), old.router.top_k,
                                   old.router.num_tasks, ep_size, router=old.router)
        if world > 1:
            new.set_deepspeed_parallelism(use_data_before_expert_parallel)
        for local, global_id in zip(new.local_experts, new.global_expert_ids()):
            local.load_state_dict(experts[global_id].state_dict())
        device = next(old.parameters()).device
        new.to(device=device, dtype=fc1.weight.dtype)
        new.name = getattr(old, "name", path)
        replace_module(model, path, new)
    return model


def convert_to_single_process(model: nn.Module) -> nn.Module:
    """The reverse of :func:`convert_to_expert_parallel` (in place): every rank gets ``MoEMlp`` layers
    holding all experts, gathered over the expert-parallel group. A collective when ``ep_size > 1``:
    every rank must call it."""
    for path, layer in expert_parallel_layers(model):
        router = layer.router
        fc1 = layer.local_experts[0].fc1
        new = MoEMlp(fc1.in_features, fc1.out_features, layer.num_experts, router.top_k, router.num_tasks)
        new.router = router
        for global_id, state in _gather_expert_states(layer).items():
            new.experts.experts[global_id].load_state_dict(state)
        new.to(device=fc1.weight.device, dtype=fc1.weight.dtype)
        new.name = layer.name
        replace_module(model, path, new)
    return model


def _gather_expert_states(layer: ExpertParallelMoEMlp) -> dict[int, dict[str, torch.Tensor]]:
    local = {g: {k: v.detach().clone() for k, v in m.state_dict().items()}
             for g, m in zip(layer.global_expert_ids(), layer.local_experts)}
    if layer.ep_size == 1:
        return local
    group = layer.ep_group
    keys = list(next(iter(local.values())).keys())
    flat = torch.cat([local[g][k].reshape(-1) for g in sorted(local) for k in keys])
    parts = [torch.empty_like(flat) for _ in range(layer.ep_size)]
    dist.all_gather(parts, flat.contiguous(), group=group)
    template = next(iter(local.values()))
    out = {}
    for r, part in enumerate(parts):
        offset = 0
        for i in range(layer.num_local_experts):
            state = {}
            for k in keys:
                n = template[k].numel()
                state[k] = part[offset:offset + n].view_as(template[k]).clone()
                offset += n
            out[r * layer.num_local_experts + i] = state
    return out
