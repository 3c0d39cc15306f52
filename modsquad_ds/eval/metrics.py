"""The paper's Taskonomy metrics (Table 1) as exact sums and counts over a whole split.

Each task's metric family comes from the task registry (``TaskSpec.metric``):

- ``rmse`` (depth_euclidean, depth_zbuffer): RMSE, absolute error, relative error |p - t| / t and
  the threshold accuracies delta < 1.25, 1.25^2, 1.25^3 (share of pixels with max(p/t, t/p) below
  the threshold), all in metres over valid pixels. Relative error and deltas need t > 0 and take
  p clamped to >= 1e-6 m (a negative depth prediction is as wrong as a tiny one).
- ``accuracy`` (class_object, class_scene): top-1 of the prediction equals top-1 of the soft label.
- ``l2`` (principal_curvature): mean squared error over valid pixels and channels.
- ``l1`` (every other pixel task): mean absolute error over valid pixels and channels.
- ``miou`` (segment_semantic): mean over classes present in prediction or target of
  intersection / union, over labelled pixels (plus pixel accuracy).

Valid pixels are the release's invalid-pixel masks carried by the batch (``batch["masks"]``, built
from the raw files before resizing; see data/decode.py), times a per-sample weight that marks the
padding samples an evaluation adds to give every rank the same number of batches.

Why sums: a metric is a ratio of sums over the split (RMSE = sqrt(sum sq / count)). Every rank adds
its pixels' sums into :class:`MetricSums`; one all-reduce of the sums, then the ratios, gives the
number one process would compute on the whole split, bit for bit up to float64 summation order.
Averaging per-rank averages would not (ranks hold different numbers of valid pixels).
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import torch

from modsquad_ds.data.tasks import TaskSpec, get_task

DELTA_BASE = 1.25
DEPTH_EPS = 1e-6

SUM_KEYS = {
    "rmse": ("sq_err", "abs_err", "count", "rel_err", "delta1", "delta2", "delta3", "pos_count"),
    "accuracy": ("correct", "count"),
    "l2": ("sq_err", "count"),
    "l1": ("abs_err", "count"),
}

MAIN_METRIC = {"rmse": "rmse", "accuracy": "accuracy", "l2": "l2", "l1": "l1", "miou": "miou"}
"""The metric that stands for a task in Delta_t (the paper: depth by RMSE only)."""


def main_metric(task: str) -> str:
    return MAIN_METRIC[get_task(task).metric]


def _valid(pred: torch.Tensor, mask: Optional[torch.Tensor], weight_B: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) float 0/1 of the elements that count: mask x per-sample weight."""
    b = pred.shape[0]
    w = weight_B.to(torch.float64).view(b, 1, 1, 1)
    if mask is not None:
        w = w * mask.to(torch.float64)
    return w.expand_as(pred)


def task_sums(spec: TaskSpec, pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor],
              weight_B: torch.Tensor) -> torch.Tensor:
    """This batch's sums for one task, as a float64 vector in the order of :func:`sum_keys`."""
    pred = pred.detach().to(torch.float64)
    if spec.metric == "accuracy":
        hit = (pred.argmax(-1) == target.argmax(-1)).to(torch.float64)
        w = weight_B.to(torch.float64)
        return torch.stack([(hit * w).sum(), w.sum()])
    if spec.metric == "miou":
        c = spec.channels
        labels = pred.argmax(1)  # (B, H, W)
        w = weight_B.to(torch.bool).view(-1, 1, 1).expand_as(labels)
        if mask is not None:
            w = w & mask[:, 0].to(torch.bool)
        idx = target.long()[w] * c + labels[w]
        return torch.bincount(idx, minlength=c * c).to(torch.float64)
    target = target.to(torch.float64)
    valid = _valid(pred, mask, weight_B)
    err = pred - target
    if spec.metric == "l1":
        return torch.stack([(err.abs() * valid).sum(), valid.sum()])
    if spec.metric == "l2":
        return torch.stack([(err.square() * valid).sum(), valid.sum()])
    if spec.metric == "rmse":
        pos = valid * (target > 0)
        t_safe = torch.where(target > 0, target, torch.ones_like(target))
        p_safe = pred.clamp_min(DEPTH_EPS)
        ratio = torch.maximum(p_safe / t_safe, t_safe / p_safe)
        deltas = [((ratio < DELTA_BASE ** i) * pos).sum() for i in (1, 2, 3)]
        return torch.stack([(err.square() * valid).sum(), (err.abs() * valid).sum(), valid.sum(),
                            (err.abs() / t_safe * pos).sum(), *deltas, pos.sum()])
    raise ValueError(f"task {spec.name}: no metric named {spec.metric!r}")


def sum_length(spec: TaskSpec) -> int:
    return spec.channels ** 2 if spec.metric == "miou" else len(SUM_KEYS[spec.metric])


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else float("nan")


def finish(spec: TaskSpec, sums: Sequence[float]) -> dict[str, float]:
    """Metric values of one task from its summed vector."""
    if spec.metric == "miou":
        c = spec.channels
        conf = torch.as_tensor(list(sums), dtype=torch.float64).view(c, c)  # rows: truth, cols: prediction
        inter = conf.diag()
        union = conf.sum(0) + conf.sum(1) - inter
        present = union > 0
        miou = float((inter[present] / union[present]).mean()) if bool(present.any()) else float("nan")
        return {"miou": miou, "pixel_accuracy": _ratio(float(inter.sum()), float(conf.sum())),
                "count": float(conf.sum())}
    s = dict(zip(SUM_KEYS[spec.metric], (float(v) for v in sums)))
    if spec.metric == "rmse":
        return {"rmse": math.sqrt(_ratio(s["sq_err"], s["count"])) if s["count"] > 0 else float("nan"),
                "abs_err": _ratio(s["abs_err"], s["count"]), "rel_err": _ratio(s["rel_err"], s["pos_count"]),
                "delta1": _ratio(s["delta1"], s["pos_count"]), "delta2": _ratio(s["delta2"], s["pos_count"]),
                "delta3": _ratio(s["delta3"], s["pos_count"]), "count": s["count"]}
    if spec.metric == "accuracy":
        return {"accuracy": _ratio(s["correct"], s["count"]), "count": s["count"]}
    key = spec.metric
    return {key: _ratio(s["sq_err" if key == "l2" else "abs_err"], s["count"]), "count": s["count"]}


class MetricSums:
    """Running sums of every task's metric over the batches one rank sees.

    ``vector()`` concatenates them in task order, so ranks all-reduce one float64 tensor;
    ``load_vector()`` puts a reduced one back, and ``compute()`` turns sums into metrics.
    """

    def __init__(self, tasks: Sequence[str]):
        self.specs = [get_task(t) for t in tasks]
        self.sums = {s.name: torch.zeros(sum_length(s), dtype=torch.float64) for s in self.specs}
        self.samples = 0.0

    def update(self, preds: Mapping[str, torch.Tensor], batch: Mapping,
               weight_B: Optional[torch.Tensor] = None) -> None:
        """Add a batch. ``weight_B``: 1 for real samples, 0 for padding (default: all real)."""
        b = batch["image"].shape[0]
        weight = torch.ones(b) if weight_B is None else weight_B.detach().cpu().to(torch.float64)
        masks = batch.get("masks", {})
        for spec in self.specs:
            mask = masks.get(spec.name)
            target = batch["targets"][spec.name]
            self.sums[spec.name] += task_sums(spec, preds[spec.name].cpu(), target.cpu(),
                                              None if mask is None else mask.cpu(), weight)
        self.samples += float(weight.sum())

    def vector(self) -> torch.Tensor:
        return torch.cat([self.sums[s.name] for s in self.specs] + [torch.tensor([self.samples], dtype=torch.float64)])

    def load_vector(self, vec: torch.Tensor) -> None:
        vec = vec.detach().cpu().to(torch.float64)
        pos = 0
        for s in self.specs:
            n = sum_length(s)
            self.sums[s.name] = vec[pos:pos + n].clone()
            pos += n
        self.samples = float(vec[pos])

    def compute(self) -> dict[str, dict[str, float]]:
        return {s.name: finish(s, self.sums[s.name].tolist()) for s in self.specs}
