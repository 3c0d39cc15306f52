"""Atomic, resumable checkpoints on top of DeepSpeed's own format.

Layout under ``{out_dir}/checkpoints``::

    .partial-step_00000100/   being written (DeepSpeed's files of every rank + our per-rank state)
    step_00000100/            complete: renamed from .partial-* by rank 0 after every rank finished
    latest                    the newest complete tag, replaced atomically (DeepSpeed's convention)

A crash mid-save leaves only a ``.partial-*`` folder, which resume ignores (and the next save
removes), so the previous checkpoint stays usable. Every complete folder holds a ``manifest.json``
(sizes and SHA-256 of its files, written last, see manifest.py); resume verifies the newest folder
against it and falls back to the newest intact one, renaming a damaged folder to ``damaged-step_*``
so that it neither counts as a checkpoint nor gets overwritten. DeepSpeed's own files keep their
names (``mp_rank_00_model_states.pt``, ``layer_{L}_expert_{E}_mp_rank_00_model_states.pt``,
optimizer shards), so our export reads them; DeepSpeed's ``zero_to_fp32.py`` / ``zero_to_torch.py``
copies are removed (they fail on MoE checkpoints: use ``python -m modsquad_ds.export``). Our per-rank
state (RNG streams) is saved as tensors and plain values and loaded with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from modsquad_ds.config.schema import ConfigError
from modsquad_ds.distributed.collectives import is_distributed
from modsquad_ds.train import manifest

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


def step_of(folder: Path) -> int:
    """The step of a checkpoint folder named by :func:`tag_for`."""
    match = _STEP_DIR.match(Path(folder).name)
    if match is None:
        raise ValueError(f"{folder} is not a checkpoint folder name (step_NNNNNNNN)")
    return int(match.group(1))


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


class CheckpointError(ConfigError):
    """A checkpoint folder that cannot be read: one line naming the missing or bad piece."""

    def __init__(self, message: str):
        super().__init__("", message)


RESHARDED = "resharded.json"
"""Marks a checkpoint ``python -m modsquad_ds.reshard`` wrote; its weights are in RESHARDED_STATE."""
RESHARDED_STATE = "state.safetensors"


def is_resharded(folder: Path) -> bool:
    """Written by ``python -m modsquad_ds.reshard`` and not resumed yet: no DeepSpeed files, one
    layout-free safetensors file (export/reshard.py)."""
    return (Path(folder) / RESHARDED).is_file()


def find_checkpoint(run_dir: Path, step: Optional[int] = None) -> Path:
    """The complete checkpoint folder of ``run_dir`` at ``step`` (None: the one ``latest`` names, else
    the newest complete one). Folders still being written (``.partial-*``) are never chosen."""
    root = Path(run_dir) / "checkpoints"
    found = complete_checkpoints(root)
    if step is not None:
        folder = root / tag_for(step)
        if folder not in found:
            have = ", ".join(str(step_of(p)) for p in found) or "none"
            raise CheckpointError(f"{root}: no complete checkpoint for step {step} (complete steps: {have})")
        return folder
    if not found:
        partial = sorted(p.name for p in root.glob(".partial-*")) if root.is_dir() else []
        extra = f" (only unfinished {', '.join(partial)})" if partial else ""
        raise CheckpointError(f"{root}: no complete checkpoint (step_NNNNNNNN folder){extra}")
    latest = root / "latest"
    if latest.is_file():
        named = root / latest.read_text().strip()
        if named in found:
            return named
    return found[-1]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    np_state = np.random.get_state()
    # The CUDA generator draws the router noise and drop-path masks of a model on the GPU: without
    # it a resumed CUDA run would not equal the uninterrupted one (tests/gpu/test_trainer_cuda.py).
    cuda = {"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() and torch.cuda.is_initialized() else {}
    return {
        **cuda,
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
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))


def _barrier() -> None:
    if is_distributed():
        dist.barrier()


RESHARDABLE = ("world_size", "train.ep_size", "data.batch_size")
"""Layout settings modsquad_ds.reshard can change (modsquad_ds/export/reshard.py)."""

ARCHITECTURE = ("model.img_size", "model.patch_size", "model.in_chans", "model.embed_dim", "model.depth",
                "model.num_heads", "model.mlp_ratio", "model.qkv_bias", "model.class_head", "moe.placement",
                "moe.first_block", "moe.attn", "moe.mlp", "moe.router_noise", "moe.wide_dense_attention")
"""Settings that shape the model: its weights load only into a model built the same way (some, such
as ``model.num_heads``, would load into another shape without an error and mean something else)."""


def run_layout(cfg, world_size: int) -> dict:
    """The settings a resumed run must share with the run that saved (:func:`check_layout`): the data
    order's (world size, batch, workers, subset), the parallel layout's and the model's."""
    layout = {"world_size": world_size, "train.ep_size": cfg.train.ep_size, "data.batch_size": cfg.data.batch_size,
              "data.workers": cfg.data.workers, "data.fraction": cfg.data.fraction,
              "tasks.names": list(cfg.tasks.names), "finetune.mode": cfg.finetune.mode}
    for key in ARCHITECTURE:
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        layout[key] = asdict(value) if is_dataclass(value) else value
    return layout


def engine_format(ds_config: dict) -> dict:
    """What DeepSpeed's optimizer files depend on besides the layout: the ZeRO stage and the precision
    (``bf16_zero_pp_rank_*`` and ``zero_pp_rank_*`` files hold different state)."""
    bf16 = ds_config.get("bf16", {}).get("enabled", False)
    return {"zero_stage": ds_config.get("zero_optimization", {}).get("stage", 0), "precision": "bf16" if bf16 else "fp32"}


class ResumeMismatch(ValueError):
    """The newest checkpoint was made under settings this run cannot continue from."""


class CheckpointDamaged(ValueError):
    """Checkpoints exist but none passes its manifest check: the message names the damaged file."""


# DeepSpeed copies these into every ZeRO checkpoint (engine._copy_recovery_script); they reject
# expert-parallel folders ("... is not a model state checkpoint"), so a user would find a broken tool.
_DEEPSPEED_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")


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
                hint += (f"; to continue on another layout: python -m modsquad_ds.reshard --run {folder.parents[1]} "
                         f"--world-size N --ep-size E --out NEW_RUN_DIR, then train with --config NEW_RUN_DIR/config.yaml")
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
    _barrier()  # every rank's files are on disk before they are listed in the manifest
    if rank == 0:
        for script in _DEEPSPEED_SCRIPTS:  # DeepSpeed versions put them in the tag folder or beside it
            (root / partial_tag / script).unlink(missing_ok=True)
            (root / script).unlink(missing_ok=True)
    _barrier()
    sums = manifest.build(root / partial_tag)  # collective: each rank hashes its share
    if rank == 0:
        manifest.write(root / partial_tag, sums)  # last: a folder with a manifest is complete
        os.replace(root / partial_tag, root / tag)
        _write_atomic(root / "latest", tag)
        for old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return root / tag


def newest_intact(root: Path, on_skip: Optional[Callable[[str], None]] = None) -> Optional[Path]:
    """The newest checkpoint folder that passes its manifest (a collective); None if there is none.
    Damaged newer folders are renamed to ``damaged-step_*`` and reported through ``on_skip``; if
    every folder is damaged, CheckpointDamaged names the newest one's damaged file."""
    found = complete_checkpoints(root)
    damaged = []
    for folder in reversed(found):
        problem = manifest.verify(folder)
        if problem is None:
            break
        damaged.append((folder, problem))
    else:
        if damaged:
            raise CheckpointDamaged(f"cannot resume from {root}: {damaged[0][1]}; no older checkpoint is "
                                    "intact (restore the file, or start over with --no-resume)")
        return None
    _barrier()  # every rank has verified before any folder is renamed
    rank = dist.get_rank() if dist.is_initialized() else 0
    for bad, problem in damaged:
        aside = bad.with_name(f"damaged-{bad.name}")
        if rank == 0:
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(bad, aside)
        if on_skip is not None:
            on_skip(f"skipped checkpoint {bad.name} (moved to {aside.name}): {problem}")
    if damaged and rank == 0:
        _write_atomic(root / "latest", folder.name)
    _barrier()
    return folder


def load_latest(engine, root: Path, layout: dict,
                on_skip: Optional[Callable[[str], None]] = None) -> Optional[tuple[TrainPosition, dict]]:
    """Load the newest intact checkpoint into ``engine`` (a collective); None if there is none.
    ``on_skip`` receives one line per damaged newer checkpoint passed over."""
    folder = newest_intact(root, on_skip)
    if folder is None:
        return None
    check_layout(folder, layout)
    tag = folder.name
    rank = dist.get_rank() if dist.is_initialized() else 0
    if is_resharded(folder):
        from modsquad_ds.export.reshard import load_into_engine

        return load_into_engine(engine, folder, rank)
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
