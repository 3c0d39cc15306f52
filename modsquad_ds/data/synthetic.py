"""Random batches in the loader's batch format, for smoke runs, FLOP tables and tests.

Not a data set: targets are noise of the right shape, dtype and range for each task's loss.
"""

from __future__ import annotations

from typing import Sequence

import torch

from modsquad_ds.data.tasks import get_task


def synthetic_batch(task_names: Sequence[str], batch_size: int, img_size: int,
                    generator: torch.Generator | None = None) -> dict:
    g = generator
    b, s = batch_size, img_size
    batch = {"image": torch.randn(b, 3, s, s, generator=g), "targets": {}, "masks": {},
             "keys": [f"synthetic_{i}" for i in range(b)]}
    for name in task_names:
        spec = get_task(name)
        if spec.kind == "class":
            batch["targets"][name] = torch.rand(b, spec.channels, generator=g).softmax(-1)
        elif spec.loss == "pixel_ce":
            batch["targets"][name] = torch.randint(0, spec.channels, (b, s, s), generator=g)
        else:
            batch["targets"][name] = torch.rand(b, spec.channels, s, s, generator=g)
        if spec.depth_masked:
            batch["masks"][name] = torch.rand(b, 1, s, s, generator=g) > 0.1
    return batch
