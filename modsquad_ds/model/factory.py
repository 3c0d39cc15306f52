"""Build the model of a run configuration."""

from __future__ import annotations

from modsquad_ds.config.schema import RunConfig
from modsquad_ds.model.vit import ModSquadViT


def build_model(cfg: RunConfig) -> ModSquadViT:
    model = ModSquadViT(cfg.model, cfg.moe, cfg.tasks.names)
    if cfg.model.pretrained:
        from modsquad_ds.model.pretrained import load_dense_checkpoint

        load_dense_checkpoint(model, cfg.model.pretrained)
    return model


def build_dense_peer(cfg: RunConfig) -> ModSquadViT:
    """The dense multi-task ViT of the same width and depth: the paper's MTL baseline."""
    from dataclasses import replace

    dense_moe = replace(cfg.moe, attn=replace(cfg.moe.attn, enabled=False),
                        mlp=replace(cfg.moe.mlp, enabled=False))
    return ModSquadViT(cfg.model, dense_moe, cfg.tasks.names)
