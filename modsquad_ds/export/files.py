"""Writing and reading exported models: safetensors with their config in the metadata and beside them.

- per task: ``{task}.safetensors`` + ``{task}.json`` (:class:`~modsquad_ds.export.task_model.TaskViT`)
- whole model: ``whole.safetensors`` + ``whole.json`` (the run's resolved config): the full
  ``ModSquadViT`` state dict in the single-process ``MoEMlp`` naming, every task.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from modsquad_ds.export.task_model import CONFIG_KEY, TaskViT

WHOLE_KEY = "modsquad_run_config"


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def save_safetensors(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def write_task_model(out_dir: Path, config: dict, state: dict[str, torch.Tensor]) -> Path:
    path = Path(out_dir) / f"{config['task']}.safetensors"
    save_safetensors(path, state, {CONFIG_KEY: json.dumps(config)})
    _atomic_json(path.with_suffix(".json"), config)
    return path


def write_whole_model(out_dir: Path, run_config: dict, state: dict[str, torch.Tensor]) -> Path:
    path = Path(out_dir) / "whole.safetensors"
    save_safetensors(path, state, {WHOLE_KEY: json.dumps(run_config)})
    _atomic_json(path.with_suffix(".json"), run_config)
    return path


def is_whole_model(path: Path) -> bool:
    with safe_open(str(path), framework="pt") as f:
        return WHOLE_KEY in (f.metadata() or {})


def load_whole_model(path: Path, device: str = "cpu"):
    """``(model, cfg)``: the full ``ModSquadViT`` of a whole-model export (plain PyTorch + timm, no
    DeepSpeed, in eval mode on ``device``) and the run config it was built from."""
    from modsquad_ds.config.loader import build
    from modsquad_ds.config.schema import RunConfig
    from modsquad_ds.model.vit import ModSquadViT

    with safe_open(str(path), framework="pt") as f:
        cfg = build(RunConfig, json.loads(f.metadata()[WHOLE_KEY]))
    model = ModSquadViT(cfg.model, cfg.moe, cfg.tasks.names)
    model.load_state_dict(load_file(str(path), device=str(device)), strict=True)
    return model.to(device).eval(), cfg


def load_task_model(path: Path, device: str = "cpu") -> TaskViT:
    return TaskViT.from_file(path, device)
