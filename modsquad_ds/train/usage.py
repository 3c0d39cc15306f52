"""Expert usage per task and MoE layer, accumulated over training for the export and evaluation
tools (pruning drops each task's rarely used experts; the usage maps show how tasks relate)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from modsquad_ds.distributed.collectives import all_reduce_tensor
from modsquad_ds.moe.stats import RoutingStats


class UsageAccumulator:
    def __init__(self, task_names: Sequence[str]):
        self.task_names = list(task_names)
        self.layers: dict[str, dict] = {}

    def add(self, routing: Sequence[RoutingStats]) -> None:
        # Accumulate where the tables live: no device-to-host copy (and sync) per micro step.
        for r in routing:
            entry = self.layers.setdefault(r.layer, {
                "kind": r.kind, "top_k": r.top_k,
                "counts": torch.zeros_like(r.count_table_TE, dtype=torch.float64),
                "tokens": torch.zeros_like(r.tokens_T, dtype=torch.float64)})
            if entry["counts"].device != r.count_table_TE.device:  # restored from a checkpoint
                entry["counts"] = entry["counts"].to(r.count_table_TE.device)
                entry["tokens"] = entry["tokens"].to(r.tokens_T.device)
            entry["counts"] += r.count_table_TE.detach()
            entry["tokens"] += r.tokens_T.detach()

    def global_tables(self) -> dict[str, dict]:
        """Counts summed over all ranks (one collective when distributed), on the CPU."""
        local = [t.cpu().reshape(-1) for e in self.layers.values() for t in (e["counts"], e["tokens"])]
        if not local:
            return {}
        summed = all_reduce_tensor(torch.cat(local)).split([t.numel() for t in local])
        out = {}
        for i, (name, entry) in enumerate(self.layers.items()):
            out[name] = {"kind": entry["kind"], "top_k": entry["top_k"],
                         "counts": summed[2 * i].view_as(entry["counts"]).clone(),
                         "tokens": summed[2 * i + 1].view_as(entry["tokens"]).clone()}
        return out

    def state_dict(self) -> dict:
        return {name: {k: (v.cpu().clone() if torch.is_tensor(v) else v) for k, v in e.items()}
                for name, e in self.layers.items()}

    def load_state_dict(self, state: dict, zeroed: bool = False) -> None:
        """Restore saved tables. A checkpoint holds the sums over all ranks: one rank takes them back
        and the others pass ``zeroed=True`` (same layers, zero counts), so the next global sum is right
        and every rank reduces the same tables in the same order."""
        self.layers = {name: {k: (torch.zeros_like(v) if zeroed and torch.is_tensor(v) else v)
                              for k, v in e.items()} for name, e in state.items()}


def write_usage(path: Path, task_names: Sequence[str], tables: dict[str, dict]) -> None:
    """JSON: per layer, the share of each task's tokens routed to each expert (P(E|T) of hard
    top-k choices, rows sum to top_k) and the raw counts."""
    layers = []
    for name, t in tables.items():
        freq = t["counts"] / t["tokens"].clamp_min(1).unsqueeze(1)
        layers.append({"layer": name, "kind": t["kind"], "top_k": t["top_k"],
                       "frequency": freq.tolist(), "counts": t["counts"].tolist(), "tokens": t["tokens"].tolist()})
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"tasks": list(task_names), "layers": layers}))
    tmp.replace(path)


def plot_usage(path: Path, task_names: Sequence[str], tables: dict[str, dict]) -> None:
    """One heat map per MoE layer: rows tasks, columns experts, colour the share of the task's
    tokens sent to the expert. Sharp, differing rows are what the MI loss is meant to produce."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(tables)
    if not names:
        return
    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 0.25 * len(task_names) * rows + 1.2 * rows),
                             squeeze=False)
    for ax, name in zip(axes.flat, names):
        t = tables[name]
        freq = (t["counts"] / t["tokens"].clamp_min(1).unsqueeze(1) / t["top_k"]).numpy()
        ax.imshow(freq, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(float(freq.max()), 1e-9))
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("expert", fontsize=7)
        ax.set_yticks(range(len(task_names)))
        ax.set_yticklabels(task_names, fontsize=6)
        ax.tick_params(axis="x", labelsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
