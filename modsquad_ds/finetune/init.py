"""Start a new-task model from a trained one: shared weights copied, task-specific ones fresh.

The fine-tuning model is an ordinary :class:`~modsquad_ds.model.vit.ModSquadViT` built for the new
tasks only, so parameter names and shapes are those of any run (its checkpoints, export and
resume work unchanged). Task-specific weights are the routers' stacked per-task rows
(``*.router.task_wg`` / ``task_wnoise``, shape ``(tasks, D, E)``), the task embedding rows and the
heads; every other weight is shared by all tasks and must come from the source, name for name and
shape for shape.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch
import torch.nn as nn

_TASK_ROWS = re.compile(r"^(task_embed|.*\.router\.task_w(g|noise))$")
"""Per-task stacked tensors: row t belongs to task t of the model's task list."""


def is_task_specific(key: str) -> bool:
    return bool(_TASK_ROWS.match(key)) or key.startswith("heads.")


def load_shared_weights(model: nn.Module, source: Mapping[str, torch.Tensor], source_tasks: Sequence[str],
                        init_tasks: Mapping[str, str] | None = None) -> list[str]:
    """Copy every shared weight of ``source`` (single-process ``MoEMlp`` naming, as
    ``export.reader.load_checkpoint_weights`` returns it) into ``model`` (same naming), and for
    each ``new -> src`` of ``init_tasks`` the source task's router and embedding rows into the new
    task's rows. Returns the keys copied. Raises ValueError naming the first mismatch."""
    own = model.state_dict()
    shared = sorted(k for k in own if not is_task_specific(k))
    src_shared = {k for k in source if not is_task_specific(k)}
    missing = [k for k in shared if k not in source]
    unexpected = sorted(src_shared - set(shared))
    if missing or unexpected:
        what = f"lacks {missing[0]}" if missing else f"has {unexpected[0]}, which this model lacks"
        raise ValueError(f"the source checkpoint {what} ({len(missing)} missing, {len(unexpected)} unexpected "
                         f"shared weights): its backbone differs from this model's")
    for k in shared:
        if tuple(source[k].shape) != tuple(own[k].shape):
            raise ValueError(f"{k}: shape {tuple(source[k].shape)} in the source checkpoint, "
                             f"{tuple(own[k].shape)} in this model")
    task_names = list(getattr(model, "task_names"))
    copied = list(shared)
    with torch.no_grad():
        for k in shared:
            own[k].copy_(source[k].to(own[k].dtype))
        for new, src in (init_tasks or {}).items():
            j, i = task_names.index(new), list(source_tasks).index(src)
            for k in own:
                if _TASK_ROWS.match(k) and k in source:
                    own[k][j].copy_(source[k][i].to(own[k].dtype))
                    copied.append(f"{k}[{new}]")
    return copied
