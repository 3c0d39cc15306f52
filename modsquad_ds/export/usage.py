"""Per-task expert usage for pruning: from the statistics training saved, or measured on data.

Tables have the :class:`~modsquad_ds.train.usage.UsageAccumulator` shape: per MoE layer path
``{"kind", "top_k", "counts" [T, E], "tokens" [T]}`` (hard top-k choices, summed over ranks).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import torch

from modsquad_ds.export.reader import CheckpointError, CheckpointWeights, find_checkpoint
from modsquad_ds.progress import track
from modsquad_ds.train.usage import UsageAccumulator


def training_usage(run_dir: Path, weights: CheckpointWeights) -> tuple[dict[str, dict], str]:
    """(tables, where from). ``run_dir/usage.json`` holds the sums over all ranks as of the newest
    save, so it is used for the newest checkpoint; an older checkpoint has its own tables, the sums
    over all ranks as of its step (the trainer reduces them before saving)."""
    path = Path(run_dir) / "usage.json"
    newest = find_checkpoint(run_dir) == weights.folder
    if newest and path.is_file():
        data = json.loads(path.read_text())
        if list(data.get("tasks", [])) != list(weights.config.tasks.names):
            raise CheckpointError(f"{path}: tasks {data.get('tasks')} differ from config.yaml's")
        tables = {layer["layer"]: {"kind": layer["kind"], "top_k": layer["top_k"],
                                   "counts": torch.tensor(layer["counts"], dtype=torch.float64),
                                   "tokens": torch.tensor(layer["tokens"], dtype=torch.float64)}
                  for layer in data["layers"]}
        return tables, f"training statistics, all ranks ({path})"
    if weights.usage:
        return ({name: {**t, "counts": torch.as_tensor(t["counts"]).double(), "tokens": torch.as_tensor(t["tokens"]).double()}
                 for name, t in weights.usage.items()},
                f"training statistics saved in {weights.folder.name}, all {weights.world_size} ranks as of "
                f"that step (run_dir/usage.json belongs to a newer checkpoint)")
    raise CheckpointError(f"{run_dir}: no training usage statistics (usage.json or the checkpoint's usage "
                          f"tables); use --usage calibration --shards DIR")


@torch.no_grad()
def calibration_usage(model: torch.nn.Module, cfg, shards: str, split: str, max_batches: Optional[int],
                      batch_size: Optional[int] = None, progress: bool = True) -> tuple[dict[str, dict], str]:
    """Usage of the full model in eval mode on ``split`` of the shards in ``shards`` (the paper's
    way: frequencies on data). Returns (tables, description)."""
    from modsquad_ds.data.loader import build_eval_loader
    from modsquad_ds.data.shard_index import index_path

    if not index_path(shards, split).is_file():
        have = sorted(p.name[:-len(".index.json")] for p in Path(shards).glob("*.index.json"))
        raise CheckpointError(f"--shards {shards}: no {split}.index.json for --split {split} "
                              f"(splits there: {', '.join(have) or 'none; write shards with data_tools.make_shards'})")
    data = dataclasses.replace(cfg.data, source="shards", shards_dir=str(shards), workers=0,
                               batch_size=batch_size or cfg.data.batch_size)
    loader = build_eval_loader(dataclasses.replace(cfg, data=data), 0, 1, split)
    total = len(loader) if max_batches is None else min(max_batches, len(loader))
    acc = UsageAccumulator(cfg.tasks.names)
    model.eval()
    images = 0
    for i, batch in enumerate(track(loader, total=total, desc="calibration", unit="batch", enabled=progress)):
        if i >= total:
            break
        acc.add(model(batch["image"]).routing)
        images += batch["image"].shape[0]
    if not images:
        raise CheckpointError(f"{shards}: split {split!r} gave no calibration batch "
                              f"(fewer samples than data.batch_size {data.batch_size}?)")
    return acc.global_tables(), f"calibration on {images} images of {shards} ({split})"
