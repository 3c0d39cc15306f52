"""Which weights train in each fine-tuning mode, and freezing the rest for real.

Freezing is ``requires_grad = False``: autograd then computes no gradient for the weight, DeepSpeed
leaves it out of its gradient reduction, and ``moe.ds_adapter.moe_param_groups`` leaves it out of
the optimizer, so it holds no state for it and no weight decay moves it. Routers are selected by
module type (:class:`~modsquad_ds.moe.router.TaskRouter`), which finds them whether the MoE MLP
layers are ``MoEMlp`` or DeepSpeed's ``ExpertParallelMoEMlp`` (where they sit under
``deepspeed_moe.gate.router``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from modsquad_ds.moe.router import TaskRouter


def trainable_names(module: nn.Module, mode: str) -> set[str]:
    """Parameter names of ``module`` (a ``TrainModule``: ``model`` + ``objective``) that train in ``mode``."""
    names = {n for n, _ in module.named_parameters()}
    if mode in ("all", "scratch"):
        return names
    if mode not in ("routers", "heads"):
        raise ValueError(f"unknown fine-tuning mode {mode!r}")
    # the objective's uncertainty weights weigh losses, not features: they train in every mode
    keep = {n for n in names if n.startswith(("objective.", "model.heads."))}
    if mode == "routers":
        keep.add("model.task_embed")
        for path, sub in module.named_modules():
            if isinstance(sub, TaskRouter):
                keep.update(f"{path}.{n}" for n, _ in sub.named_parameters())
    return keep


@dataclass
class FreezeReport:
    trainable: int
    """Trainable parameter elements on this rank."""
    frozen: int
    frozen_names: list[str]

    def describe(self) -> str:
        total = self.trainable + self.frozen
        return (f"{self.trainable:,} of {total:,} parameters train ({100.0 * self.trainable / max(total, 1):.2f}%), "
                f"{len(self.frozen_names)} tensors frozen")


def freeze(module: nn.Module, mode: str) -> FreezeReport:
    """Set ``requires_grad`` for ``mode``; call after ``convert_to_expert_parallel`` (it builds new
    expert parameters) and before the optimizer is built."""
    keep = trainable_names(module, mode)
    trainable = frozen = 0
    frozen_names = []
    for name, p in module.named_parameters():
        p.requires_grad_(name in keep)
        if name in keep:
            trainable += p.numel()
        else:
            frozen += p.numel()
            frozen_names.append(name)
    return FreezeReport(trainable, frozen, frozen_names)
