"""Learn new tasks on top of a trained run: router fine-tuning and its baselines (paper Sec. 4.4).

``python -m modsquad_ds.train --config runs/demo/config.yaml --set finetune.mode=routers
--set finetune.init_from=runs/demo --set tasks.names=[class_object] --set data.fraction=0.05
--set train.out_dir=runs/demo_ft`` builds a model for the new tasks only, loads every shared
weight from the trained run (init.py), freezes what the mode does not train (trainable.py) and
trains with the ordinary trainer. See docs/finetune.md.
"""

from __future__ import annotations

from modsquad_ds.config.schema import RunConfig
from modsquad_ds.finetune.init import is_task_specific, load_shared_weights
from modsquad_ds.finetune.source import check_source, finetune_ds_config, load_source_weights, zero_note
from modsquad_ds.finetune.trainable import FreezeReport, freeze, trainable_names

__all__ = ["FreezeReport", "build_finetune_model", "check_source", "finetune_ds_config", "freeze",
           "is_task_specific", "load_shared_weights", "load_source_weights", "trainable_names", "zero_note"]


def build_finetune_model(cfg: RunConfig):
    """The new-task model with the source run's shared weights (new rows and heads from the current
    torch seed: the trainer seeds it identically on every rank)."""
    from modsquad_ds.model.vit import ModSquadViT

    weights = load_source_weights(cfg)
    model = ModSquadViT(cfg.model, cfg.moe, cfg.tasks.names)
    load_shared_weights(model, weights.model, weights.config.tasks.names, cfg.finetune.init_tasks)
    return model
