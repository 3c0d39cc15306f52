"""Finding and checking a run's checkpoint before any process group starts, and loading its weights
into a DeepSpeed engine (module only: weights load at any world size and ep_size, see the DeepSpeed
notes in docs/evaluation.md)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from modsquad_ds.train.checkpoint import ARCHITECTURE, RESHARDED_STATE, CheckpointError, is_resharded, run_layout

MODEL_FILE = "mp_rank_00_model_states.pt"


def check_files(folder: Path, expected_expert_files: int = 0) -> None:
    """Every weight file present and a readable torch archive (zip), or a resharded checkpoint's one
    safetensors file (``python -m modsquad_ds.reshard``, not yet resumed); raises CheckpointError."""
    if is_resharded(folder):
        if not (folder / RESHARDED_STATE).is_file():
            raise CheckpointError(f"checkpoint {folder} is incomplete: {RESHARDED_STATE} is missing")
        return
    model_file = folder / MODEL_FILE
    if not model_file.is_file():
        raise CheckpointError(f"checkpoint {folder} is incomplete: {MODEL_FILE} is missing")
    experts = sorted(folder.glob("layer_*_expert_*_mp_rank_00_model_states.pt"))
    if len(experts) < expected_expert_files:
        raise CheckpointError(f"checkpoint {folder} is incomplete: {len(experts)} of {expected_expert_files} "
                              "expert weight files (layer_*_expert_*_mp_rank_00_model_states.pt)")
    for path in [model_file, *experts]:
        try:
            ok = zipfile.is_zipfile(path) and zipfile.ZipFile(path).testzip() is None
        except (OSError, zipfile.BadZipFile):
            ok = False
        if not ok:
            raise CheckpointError(f"checkpoint file {path} is corrupt (not a readable torch archive)")


def check_architecture(folder: Path, cfg) -> None:
    """The model ``cfg`` builds is the one the checkpoint holds (its ``layout.json``, when it has one):
    another shape fails late inside DeepSpeed, and some settings (``model.num_heads``) would load
    without an error and evaluate another model. Raises CheckpointError naming the setting."""
    path = folder / "layout.json"
    if not path.is_file():
        return
    saved, current = json.loads(path.read_text()), run_layout(cfg, world_size=1)
    for key in ARCHITECTURE:
        if key in saved and saved[key] != current[key]:
            raise CheckpointError(f"{folder} holds a model with {key}={saved[key]!r}, the config asks for "
                                  f"{current[key]!r}: evaluate with the run's own model settings")


def expected_expert_files(cfg) -> int:
    """Expert files DeepSpeed writes: one per MoE MLP layer and global expert."""
    from modsquad_ds.model.vit import block_kinds

    layers = sum(mlp for _, mlp in block_kinds(cfg.model.depth, cfg.moe))
    return layers * cfg.moe.mlp.num_experts


def load_weights(engine, folder: Path) -> None:
    """Module-only load of ``folder`` into ``engine`` (a collective); CheckpointError on failure."""
    if is_resharded(folder):  # each rank takes its share of the one file, as a resume does
        import torch.distributed as dist

        from modsquad_ds.export.reshard import load_into_engine

        load_into_engine(engine, folder, dist.get_rank() if dist.is_initialized() else 0)
        return
    try:
        path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_module_only=True,
                                         load_optimizer_states=False, load_lr_scheduler_states=False)
    except Exception as err:  # noqa: BLE001 - DeepSpeed raises many kinds; the user needs one line
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        # "Error(s) in loading state_dict for TrainModule:" says nothing without its next line
        first = " ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines[0] if lines else "")
        raise CheckpointError(f"cannot load checkpoint {folder}: {type(err).__name__}: {first}") from None
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {folder}")
