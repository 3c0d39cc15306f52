"""The task registry: what each Taskonomy task is, its output, loss and metric.

One entry per task. To add a task, add a :class:`TaskSpec` here (and, for a new loss, a function
in :mod:`modsquad_ds.model.task_losses`); the model's heads, the loss and the data pipeline all read
this table.

Targets follow one convention everywhere: a pixel task's target is float ``(B, C, H, W)`` (long
``(B, H, W)`` class ids for ``pixel_ce``), a classification task's target is a float ``(B, C)``
probability vector (Taskonomy's class files are soft labels), and a mask, when present, is bool
``(B, 1, H, W)`` with True on valid pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["pixel", "class"]
LossName = Literal["ce_soft", "pixel_ce", "cosine", "l2", "l1"]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    domain: str
    """Folder / file domain name in the Taskonomy release."""
    kind: Kind
    channels: int
    """Output channels (pixel tasks) or classes (classification tasks)."""
    loss: LossName
    metric: str
    lower_is_better: bool
    depth_masked: bool = False
    """Invalid where the raw depth_zbuffer is >= 64500 (no geometry), as original Taskonomy masks."""


def _pixel(name, channels, loss, metric="l1", depth_masked=False, domain=None):
    return TaskSpec(name, domain or name, "pixel", channels, loss, metric, True, depth_masked)


_SPECS = [
    # The paper's 13 Taskonomy tasks (Sec. 4.1); losses as its "Loss Functions" paragraph says.
    TaskSpec("class_object", "class_object", "class", 100, "ce_soft", "accuracy", False),
    TaskSpec("class_scene", "class_scene", "class", 63, "ce_soft", "accuracy", False),
    _pixel("depth_euclidean", 1, "l1", "rmse", depth_masked=True),
    _pixel("depth_zbuffer", 1, "l1", "rmse", depth_masked=True),
    _pixel("normal", 3, "cosine", "l1", depth_masked=True),
    _pixel("principal_curvature", 2, "l2", "l2", depth_masked=True),
    _pixel("reshading", 1, "l1", "l1", depth_masked=True),
    _pixel("edge_texture", 1, "l1"),
    _pixel("edge_occlusion", 1, "l1", depth_masked=True),
    _pixel("keypoints2d", 1, "l1"),
    _pixel("keypoints3d", 1, "l1", depth_masked=True),
    _pixel("segment_unsup2d", 1, "l1"),
    _pixel("segment_unsup25d", 1, "l1"),
    # Not among the paper's 13 (corrupt annotations upstream) but part of the release.
    TaskSpec("segment_semantic", "segment_semantic", "pixel", 17, "pixel_ce", "miou", False),
]

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in _SPECS}


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}") from None


def is_depth_masked(domain: str) -> bool:
    """True for a release domain whose task's targets are masked where depth has no geometry; False
    for the others, and for domains that are no task (``rgb``)."""
    spec = TASKS.get(domain)
    return spec is not None and spec.depth_masked


def register_task(spec: TaskSpec) -> None:
    """Add a task (e.g. a new task learned by router and head tuning)."""
    if spec.name in TASKS:
        raise ValueError(f"task {spec.name!r} is already registered")
    TASKS[spec.name] = spec
