"""ZeRO stage 0 optimizer files: which parameter each saved entry belongs to, and the fp32 masters.

At ZeRO 0 DeepSpeed saves each expert-parallel rank's whole optimizer state in
``expp_rank_{r}_mp_rank_00_optim_states.pt`` (under ``optimizer``), with parameters by index, not by
name: the order of the trainer's parameter groups (``moe_param_groups``) over the parameters that
train. Two formats, by precision (DeepSpeed 0.19.8, ``runtime/engine.py:_configure_optimizer``):

- fp32: the torch optimizer's own state dict (``state``, ``param_groups``); the module weights are
  the masters.
- bf16: DeepSpeed's ``FP16_UnfusedOptimizer`` (``runtime/fp16/unfused_optimizer.py``, which wraps a
  client optimizer for bf16 without ZeRO): the torch state dict under ``optimizer_state_dict``, and
  under ``fp32_groups`` the fp32 master of every parameter that trains, in the same order. The
  module holds only their bf16 copies. Fine-tuning in modes ``routers`` and ``heads`` always runs at
  ZeRO 0 (finetune/source.py), so every bf16 fine-tuning run saves this format.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from modsquad_ds.export.reader import _LOCAL_EXPERT, CheckpointError, _global_expert_name, _load


def optimizer_file(folder: Path, ep_rank: int) -> Path:
    return Path(folder) / f"expp_rank_{ep_rank}_mp_rank_00_optim_states.pt"


def param_names(cfg) -> list[list[str]]:
    """For each expert-parallel rank of the run, the engine names (``model.``/``objective.``, experts
    by *global* id), in the optimizer's index order, of the parameters it optimised: the trainer's
    module, frozen as ``cfg.finetune.mode`` freezes it, through its parameter groups. One build of
    the model serves every rank (they differ only in which experts they own)."""
    from modsquad_ds.finetune import freeze
    from modsquad_ds.model.objective import MultiTaskObjective
    from modsquad_ds.model.vit import ModSquadViT
    from modsquad_ds.moe.ds_adapter import ExpertParallelMoEMlp, expert_parallel_layers, moe_param_groups
    from modsquad_ds.moe.ds_adapter.convert import replace_module
    from modsquad_ds.moe.layer import MoEMlp
    from modsquad_ds.train.module import TrainModule

    model = ModSquadViT(cfg.model, cfg.moe, cfg.tasks.names)
    # convert_to_expert_parallel without its process groups: only names and order matter here
    for path, old in [(n, m) for n, m in model.named_modules() if isinstance(m, MoEMlp)]:
        fc1 = old.experts.experts[0].fc1
        replace_module(model, path, ExpertParallelMoEMlp(fc1.in_features, fc1.out_features, len(old.experts.experts),
                                                         old.router.top_k, old.router.num_tasks, cfg.train.ep_size,
                                                         router=old.router))
    module = TrainModule(model, MultiTaskObjective(cfg), None)
    if cfg.finetune.enabled:  # as the trainer does: frozen weights are in no optimizer group
        freeze(module, cfg.finetune.mode)
    names = {id(p): n for n, p in module.named_parameters()}
    local = {path: layer.num_local_experts for path, layer in expert_parallel_layers(module)}
    ordered = [names[id(p)] for group in moe_param_groups(module, cfg.train.weight_decay, module.no_weight_decay())
               for p in group["params"]]

    def on_rank(name: str, ep_rank: int) -> str:  # local expert id -> global
        m = _LOCAL_EXPERT.search(name)
        return _global_expert_name(name, ep_rank * local[name[: m.start()]]) if m else name

    return [[on_rank(name, r) for name in ordered] for r in range(cfg.train.ep_size)]


@dataclass
class Zero0State:
    """One expert-parallel rank's ZeRO 0 optimizer file, by parameter name."""

    names: list[str]
    """Engine names in the optimizer's index order (:func:`param_names`)."""
    torch_state: dict
    """The torch optimizer's state dict (``state`` by index, ``param_groups``)."""
    masters: Optional[list[torch.Tensor]]
    """bf16 runs: the fp32 master of each name; None for fp32 runs."""


def read(folder: Path, cfg) -> list[Zero0State]:
    """Every expert-parallel rank's optimizer file; :class:`CheckpointError` (one line) for a missing
    file or one that is not what the run's model and fine-tuning mode say it must be."""
    return [_read(folder, cfg, ep_rank, names) for ep_rank, names in enumerate(param_names(cfg))]


def _read(folder: Path, cfg, ep_rank: int, names: list[str]) -> Zero0State:
    path = optimizer_file(folder, ep_rank)
    opt = _load(path).get("optimizer")
    wrapped = isinstance(opt, dict) and "fp32_groups" in opt  # bf16: FP16_UnfusedOptimizer's state
    torch_state = opt.get("optimizer_state_dict") if wrapped else opt
    if not isinstance(torch_state, dict) or "state" not in torch_state or "param_groups" not in torch_state:
        raise CheckpointError(f"{path}: no optimizer state")
    index = [i for g in torch_state["param_groups"] for i in g["params"]]
    if len(index) != len(names):
        raise CheckpointError(f"{path}: {len(index)} optimizer parameters, the run's model "
                              f"(finetune.mode {cfg.finetune.mode}) trains {len(names)}")
    masters = None
    if wrapped:
        masters = [t for group in opt["fp32_groups"] for t in group]
        if len(masters) != len(names):
            raise CheckpointError(f"{path}: {len(masters)} fp32 master weights for {len(names)} optimizer parameters")
    return Zero0State(names, torch_state, masters)


def masters(folder: Path, cfg) -> dict[str, torch.Tensor]:
    """fp32 master weights by engine name from a bf16 ZeRO 0 checkpoint's optimizer files (dense
    ones from expert-parallel rank 0: every rank holds the same); {} for fp32 runs, or when the
    folder has no optimizer files."""
    if not optimizer_file(folder, 0).is_file():
        return {}  # saved without optimizer state: the caller upcasts and says so
    out: dict[str, torch.Tensor] = {}
    for state in read(folder, cfg):
        if state.masters is None:
            return {}
        for name, value in zip(state.names, state.masters):
            out.setdefault(name, value.detach().float())
    return out
