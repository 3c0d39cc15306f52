"""The export as a function: checkpoint -> usage -> per-task pruning -> files and report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from modsquad_ds.config.loader import to_dict
from modsquad_ds.data.classes import default_keep
from modsquad_ds.data.tasks import get_task
from modsquad_ds.export.files import _atomic_json, write_task_model, write_whole_model
from modsquad_ds.export.prune import prune_plan, pruned_task_model
from modsquad_ds.export.reader import CheckpointError, load_checkpoint_weights
from modsquad_ds.export.report import markdown_table, plot_kept, task_costs
from modsquad_ds.export.task_model import TaskViT
from modsquad_ds.export.usage import calibration_usage, training_usage
from modsquad_ds.model.factory import build_dense_peer
from modsquad_ds.model.flops import count_params
from modsquad_ds.model.vit import ModSquadViT


def full_model(weights) -> ModSquadViT:
    cfg = weights.config
    model = ModSquadViT(cfg.model, cfg.moe, cfg.tasks.names)
    model.load_state_dict(weights.model, strict=True)
    return model.eval()


def _remove_previous_export(out: Path) -> None:
    """An earlier per-task export in ``out`` (the files its report.json lists, the report and the
    picture): replaced as a whole, so the folder never mixes models pruned two ways (say 13 tasks at
    1% and then 2 of them at the top 50%, whose report would describe only those 2)."""
    report = out / "report.json"
    if not report.is_file():
        return
    try:  # names only: what an export wrote here, wherever it was run from
        models = [out / Path(row["file"]).name for row in json.loads(report.read_text()).get("tasks", [])]
        files = [*models, *(m.with_suffix(".json") for m in models)]  # each model and its config beside it
    except (ValueError, KeyError, TypeError, AttributeError):
        files = []
    for path in [*files, out / "kept_experts.png", out / "report.md", report]:
        path.unlink(missing_ok=True)


@torch.no_grad()
def export_run(run: Path, step: Optional[int] = None, tasks: Optional[Sequence[str]] = None,
               threshold: Optional[float] = None, keep_top: Optional[float] = None, whole: bool = False,
               usage: str = "training", shards: Optional[Path] = None, split: str = "val",
               calibration_batches: Optional[int] = None, batch_size: Optional[int] = None,
               require_master: bool = False, out: Optional[Path] = None, progress: bool = False,
               costs: bool = True) -> dict:
    """Export ``run``; ``threshold`` / ``keep_top`` in percent. Returns a summary (also in report.json).
    ``costs=False`` skips the FLOP counts of the report (parameters only)."""
    weights = load_checkpoint_weights(run, step, require_master=require_master)
    cfg = weights.config
    out = Path(out) if out else Path(run) / "export" / weights.folder.name
    out.mkdir(parents=True, exist_ok=True)
    summary = {"run": str(run), "checkpoint": str(weights.folder), "step": weights.step,
               "weights": weights.source, "out": str(out)}
    if whole:
        path = write_whole_model(out, to_dict(cfg), weights.model)
        summary["whole"] = str(path)
        return summary

    names = list(cfg.tasks.names)
    chosen = list(tasks) if tasks else names
    unknown = [t for t in chosen if t not in names]
    if unknown:
        raise CheckpointError(f"--tasks: {unknown[0]!r} is not a task of this run ({', '.join(names)})")
    model = full_model(weights)
    _remove_previous_export(out)
    if usage == "calibration":
        tables, usage_source = calibration_usage(model, cfg, str(shards), split, calibration_batches, batch_size,
                                                 progress)
    else:
        tables, usage_source = training_usage(Path(run), weights)
    dense = build_dense_peer(cfg).eval()
    probe = torch.zeros(1, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size)
    frac = dict(threshold=None if threshold is None else threshold / 100,
                keep_top=None if keep_top is None else keep_top / 100)
    plans, rows = {}, []
    for task in chosen:
        plan = prune_plan(tables, names.index(task), **frac)
        config, state = pruned_task_model(weights, task, plan)
        task_model = TaskViT(config)
        task_model.load_state_dict(state, strict=True)
        if get_task(task).kind == "class":  # the release's class indices of the head's outputs
            config["classes"] = list(getattr(cfg.data, f"{task}_keep", None) or default_keep(task))
        config["pruning"] = {"threshold_pct": threshold, "keep_top_pct": keep_top, "usage": usage_source,
                             "source_run": str(run), "step": weights.step, "weights": weights.source,
                             "layers": {name: {"kept": p["kept"], "top_k": p["top_k"], "usage": p["usage"]}
                                        for name, p in plan.items()}}
        path = write_task_model(out, config, state)
        row = (task_costs(task_model, model, dense, task, probe) if costs
               else {"task": task, "params": count_params(task_model)})
        row.update(file=str(path), kept=sum(len(p["kept"]) for p in plan.values()),
                   experts=sum(p["num_experts"] for p in plan.values()))
        rows.append(row)
        plans[task] = plan
    if plans and next(iter(plans.values())):
        plot_kept(out / "kept_experts.png", plans)
    summary.update(usage=usage_source, threshold_pct=threshold, keep_top_pct=keep_top, tasks=rows)
    _atomic_json(out / "report.json", summary)
    if costs:
        (out / "report.md").write_text(markdown_table(rows))
    return summary

