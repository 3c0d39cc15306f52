"""Which experts each task keeps, and the pruned per-task state dict (paper Sec. 3.4).

Usage of expert e by task t in a layer is the share of the task's routing choices that went to e:
``counts[t, e] / (tokens[t] * top_k)`` (a distribution over experts, summing to 1; uniform use of 16
experts is 6.25% each). The paper drops every expert whose usage by the task is below a threshold
θ (1.0%); alternatively keep the most used H% of each layer. An expert the task never chose is
always dropped, so θ = 0 keeps exactly the experts the task used.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from modsquad_ds.export.task_model import task_config


def usage_share(counts_TE: torch.Tensor, tokens_T: torch.Tensor, top_k: int) -> torch.Tensor:
    """Share of each task's routing choices per expert, rows sum to 1 (0 for a task never routed)."""
    return counts_TE.double() / (tokens_T.double().clamp_min(1).unsqueeze(1) * top_k)


def kept_experts(share_E: torch.Tensor, counts_E: torch.Tensor, threshold: Optional[float] = None,
                 keep_top: Optional[float] = None) -> list[int]:
    """Expert ids one task keeps in one layer: usage >= ``threshold`` (a fraction, 0.01 = 1%), or the
    ``keep_top`` fraction most used (at least one); never an expert with no use. Ascending ids."""
    if (threshold is None) == (keep_top is None):
        raise ValueError("give exactly one of threshold and keep_top")
    used = [e for e in range(share_E.numel()) if counts_E[e] > 0]
    if threshold is not None:
        kept = [e for e in used if share_E[e] >= threshold]
    else:
        n = max(1, math.ceil(keep_top * share_E.numel()))
        ranked = sorted(used, key=lambda e: (-float(share_E[e]), e))  # ties: lower id first
        kept = ranked[:n]
    if not kept:  # a task that never reached this layer's experts keeps its most used one
        kept = [int(torch.argmax(share_E))]
    return sorted(kept)


def prune_plan(usage: dict[str, dict], task_index: int, threshold: Optional[float] = None,
               keep_top: Optional[float] = None) -> dict[str, dict]:
    """Per MoE layer ``{"num_experts", "kept", "top_k", "usage"}`` for one task; ``usage``: per layer
    ``{"kind", "top_k", "counts" [T, E], "tokens" [T]}`` (UsageAccumulator tables)."""
    plan = {}
    for layer, table in usage.items():
        counts = torch.as_tensor(table["counts"], dtype=torch.float64)
        tokens = torch.as_tensor(table["tokens"], dtype=torch.float64)
        share = usage_share(counts, tokens, table["top_k"])[task_index]
        kept = kept_experts(share, counts[task_index], threshold, keep_top)
        plan[layer] = {"num_experts": counts.shape[1], "kept": kept, "top_k": min(table["top_k"], len(kept)),
                       "usage": [round(float(s), 6) for s in share]}
    return plan


def prune_state_dict(full: dict[str, torch.Tensor], task_names: list[str], task: str,
                     plan: dict[str, dict]) -> dict[str, torch.Tensor]:
    """The :class:`~modsquad_ds.export.task_model.TaskViT` state dict of ``task`` from a full
    ``ModSquadViT`` state dict: this task's routers, embedding and head; the kept experts only."""
    t = task_names.index(task)
    out = {}
    for key, value in full.items():
        parts = key.split(".")
        if key == "task_embed":
            out[key] = value[t].clone()
        elif parts[0] == "heads":
            if parts[1] == task:
                out["head." + ".".join(parts[2:])] = value.clone()
        elif parts[0] == "blocks" and ".".join(parts[:3]) in plan:
            layer = ".".join(parts[:3])
            kept = plan[layer]["kept"]
            rest = ".".join(parts[3:])
            if rest == "router.task_wg":
                out[f"{layer}.router.weight"] = value[t].clone()
            elif rest == "router.task_wnoise":
                continue  # noise is a training-time device (eq. 2); inference routes by the clean logits
            elif rest in ("heads.q_weight", "heads.o_weight"):
                out[f"{layer}.{rest}"] = value[kept].clone()
            elif rest.startswith("experts.experts."):
                expert, tail = parts[5], ".".join(parts[6:])
                if int(expert) in kept:
                    out[f"{layer}.experts.experts.{kept.index(int(expert))}.{tail}"] = value.clone()
            else:  # the MoA's shared key/value projection
                out[key] = value.clone()
        else:
            out[key] = value.clone()
    return out


def pruned_task_model(weights, task: str, plan: dict[str, dict]):
    """(config, state dict) of ``task``'s standalone model from :class:`CheckpointWeights`-like ``weights``."""
    cfg = weights.config
    layers = {name: {k: p[k] for k in ("num_experts", "kept", "top_k")} for name, p in plan.items()}
    config = task_config(cfg.model, cfg.moe, task, layers, cfg.moe.first_block)
    return config, prune_state_dict(weights.model, list(cfg.tasks.names), task, plan)
