"""Atomic, resumable checkpoints on top of DeepSpeed's own format.

Layout under ``{out_dir}/checkpoints``::

    .partial-step_00000100/   being written (DeepSpeed's files of every rank + our per-rank state)
    step_00000100/            complete: renamed from .partial-* by rank 0 after every rank finished
    latest                    the newest complete tag, replaced atomically (DeepSpeed's convention)

A crash mid-save leaves only a ``.partial-*`` folder, which resume ignores (and the next save
removes), so the previous checkpoint stays usable. DeepSpeed's own files keep their names
(``mp_rank_00_model_states.pt``, ``layer_{L}_expert_{E}_mp_rank_00_model_states.pt``, optimizer
shards), so its tools and our export read them. Our per-rank state (RNG streams) is saved as
tensors and plain values and loaded with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from modsquad_ds.distributed.collectives import is_distributed

_STEP_DIR = re.compile(r"^step_(\d{8})$")


@dataclass
class TrainPosition:
    """Where training stands: enough, with the engine's state, to continue exactly."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    batch_in_epoch: int = 0
    """Micro batches of ``epoch`` already consumed (the loader's resume point)."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))


def _barrier() -> None:
    if is_distributed():
        dist.barrier()


RESHARDABLE = ("world_size", "train.ep_size", "data.batch_size")
"""Layout settings modsquad_ds.reshard can change (modsquad_ds/export/reshard.py)."""


class ResumeMismatch(ValueError):
    """The newest checkpoint was made under settings this run cannot continue from."""


def check_layout(folder: Path, layout: dict) -> None:
    """Refuse to resume under a different layout, with one line naming the setting.

    The optimizer shards depend on the world size and ep_size, the loader position on the world
    size, batch size and workers, the weights on the model and tasks: a mismatch would otherwise
    surface as a DeepSpeed shape error or, worse, as silently different data order.
    """
    path = folder / "layout.json"
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    for key, value in layout.items():
        if key in saved and saved[key] != value:
            hint = "or use --no-resume / another train.out_dir"
            if key in RESHARDABLE:  # the weights and optimizer state can move to another layout
                hint = (f"to continue on another layout: python -m modsquad_ds.reshard --run {folder.parents[1]} "
                        f"--world-size N --ep-size E --out NEW_RUN_DIR, then train with train.out_dir=NEW_RUN_DIR")
            raise ResumeMismatch(f"{folder} was saved with {key}={saved[key]!r}, this run has {value!r}: "
                                 f"resuming needs the same {key} ({hint})")


def save(engine, root: Path, position: TrainPosition, extra: dict, keep: int, layout: dict) -> Path:
    """Save on every rank (a collective); returns the complete folder. ``layout``: the settings a
    resume must match (see :func:`check_layout`)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    tag = tag_for(position.step)
    partial_tag = f".partial-{tag}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(root / tag, ignore_errors=True)  # a re-save of the same step replaces it
    _barrier()
    client_state = {"position": asdict(position), **extra}
    engine.save_checkpoint(str(root), tag=partial_tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), root / partial_tag / f"rng_rank{rank:05d}.pt")
    if rank == 0:
        (root / partial_tag / "layout.json").write_text(json.dumps({**layout, **asdict(position)}, indent=1))
    _barrier()  # every rank's files are on disk before the folder is declared complete
    if rank == 0:
        os.replace(root / partial_tag, root / tag)
        _write_atomic(root / "latest", tag)
        for old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return root / tag


def load_latest(engine, root: Path, layout: dict) -> Optional[tuple[TrainPosition, dict]]:
    """Load the newest complete checkpoint into ``engine`` (a collective); None if there is none."""
    found = complete_checkpoints(root)
    if not found:
        return None
    check_layout(found[-1], layout)
    tag = found[-1].name
    rank = dist.get_rank() if dist.is_initialized() else 0
    if (found[-1] / "resharded.json").is_file():  # written by python -m modsquad_ds.reshard
        from modsquad_ds.export.reshard import load_into_engine

        return load_into_engine(engine, found[-1], rank)
    path, client_state = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {root / tag}")
    rng_file = root / tag / f"rng_rank{rank:05d}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: streams restart
        set_rng_state(torch.load(rng_file, weights_only=True))
    position = TrainPosition(**client_state["position"])
    extra = {k: v for k, v in client_state.items() if k != "position"}
    return position, extra
