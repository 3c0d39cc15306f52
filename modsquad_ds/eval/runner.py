"""Run an evaluation pass: batches -> model -> metric sums and usage sums -> one all-reduce.

Works on whatever module holds the weights: a DeepSpeed engine's model (expert-parallel layers
included: every rank runs the same number of batches) or a plain ``ModSquadViT``. Batches are moved
to the model's device and dtype; routing sums stay on the device until the end; metrics are summed
in float64 on the CPU (one copy of the predictions per batch); every sum goes in one all-reduce.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from modsquad_ds.data.loader import start_workers, workers_killed_on_error
from modsquad_ds.data.packed import unpacked
from modsquad_ds.distributed.collectives import all_reduce_tensor
from modsquad_ds.eval.data import eval_loader
from modsquad_ds.eval.metrics import MetricSums
from modsquad_ds.eval.similarity import summarize
from modsquad_ds.eval.usage import RouteRecorder
from modsquad_ds.progress import track


@dataclass
class EvalResult:
    split: str
    metrics: dict
    """task -> metric -> value."""
    usage: dict
    """similarity.summarize of the routing (empty for dense models)."""
    samples: int
    corrupt: int
    recorder: RouteRecorder
    first: Optional[int] = None
    """N where only the split's first N samples were evaluated (``--max-samples`` below the split's
    size); None for the whole split."""

    @property
    def name(self) -> str:
        """What was evaluated, for file names and TensorBoard tags: ``test``, or ``test_first100`` for
        part of it, so that a quick look never overwrites (or passes for) the whole split's results."""
        return self.split if self.first is None else f"{self.split}_first{self.first}"


@torch.no_grad()
def evaluate_model(model, cfg, split: str, rank: int = 0, world_size: int = 1,
                   max_samples: Optional[int] = None, progress: bool = False) -> EvalResult:
    """Evaluate ``model`` (a ModSquadViT, possibly with expert-parallel layers) on ``split``.

    A collective when distributed: every rank must call it with the same arguments.
    """
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    was_training = model.training
    model.eval()
    names = list(cfg.tasks.names)
    sums = MetricSums(names)
    loader = eval_loader(cfg, split, rank, world_size, max_samples)
    corrupt = 0
    try:
        batches = start_workers(loader)
        with workers_killed_on_error(batches), RouteRecorder(model, names) as recorder:
            for batch in track(batches, total=loader.n_batches, desc=f"eval {split}", unit="batch", enabled=progress):
                batch = unpacked(batch)
                weight = batch.pop("weight")
                corrupt += int(batch.pop("corrupt"))
                recorder.sample_weight = weight.to(device, non_blocking=True)
                out = model(batch["image"].to(device=device, dtype=dtype, non_blocking=True))
                preds = {k: v.float() for k, v in out.preds.items()}
                sums.update(preds, batch, weight)
    finally:
        model.train(was_training)
    # every sum (float64 keeps them exact enough) in one all-reduce: metrics, routing, corrupt samples
    local = [sums.vector(), recorder.vector(), torch.tensor([float(corrupt)], dtype=torch.float64)]
    metric_sums, routing_sums, corrupt_sum = all_reduce_tensor(torch.cat(local)).split([v.numel() for v in local])
    sums.load_vector(metric_sums)
    recorder.load_vector(routing_sums)
    corrupt = int(corrupt_sum[0])
    first = loader.total if loader.total < loader.split_total else None
    return EvalResult(split, sums.compute(), summarize(recorder.layers) if recorder.layers else {},
                      int(round(sums.samples)), corrupt, recorder, first)
