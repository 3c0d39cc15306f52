"""The trained run a fine-tuning run starts from: checked before launch, loaded in the engine build.

:func:`check_source` runs before any process group (``python -m modsquad_ds.train`` calls it
from ``validate_before_launch``) and raises :class:`ConfigError` with one line naming the
problem: no such folder, not a run folder, no complete checkpoint (or not the requested step), a
backbone of another shape, an ``init_tasks`` source task the run never learned, or an output
folder that is the source itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from modsquad_ds.config.schema import ConfigError, RunConfig

# Settings that fix the shapes of the shared weights (expert widths are compared resolved: the
# default width depends on top_k, which may otherwise differ, as the routers are new).
_MODEL_KEYS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias")


@dataclass
class SourceRun:
    run_dir: Path
    checkpoint: Path
    step: int
    config: RunConfig


def _backbone(cfg: RunConfig) -> dict:
    m, moe = cfg.model, cfg.moe
    shape = {f"model.{k}": getattr(m, k) for k in _MODEL_KEYS}
    shape.update({"moe.placement": moe.placement, "moe.first_block": moe.first_block})
    for kind, hidden in (("attn", m.embed_dim), ("mlp", m.mlp_hidden)):
        e = getattr(moe, kind)
        shape.update({f"moe.{kind}.enabled": e.enabled, f"moe.{kind}.num_experts": e.num_experts,
                      f"moe.{kind}.expert_dim": e.resolved_dim(hidden)})
    return shape


def check_source(cfg: RunConfig) -> SourceRun:
    """Validate ``cfg.finetune`` against its source run folder; raises ConfigError."""
    from modsquad_ds.config.loader import load_config
    from modsquad_ds.export.reader import find_checkpoint

    ft = cfg.finetune
    run_dir = Path(ft.init_from)
    if not run_dir.is_dir():
        raise ConfigError("finetune.init_from", f"folder not found: {run_dir}")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError("finetune.init_from", f"{run_dir} is not a run folder (no config.yaml; "
                          "give the train.out_dir of a trained run)")
    folder = find_checkpoint(run_dir, ft.step)  # one-line CheckpointError (a ConfigError) if absent
    try:
        source_cfg = load_config([run_dir / "config.yaml"])
    except ConfigError as err:
        raise ConfigError("finetune.init_from", f"{run_dir / 'config.yaml'} does not load: {err}") from None
    theirs, ours = _backbone(source_cfg), _backbone(cfg)
    for key, value in ours.items():
        if theirs[key] != value:
            raise ConfigError(key, f"({value}) differs from the source run's ({theirs[key]}, "
                              f"{run_dir / 'config.yaml'}): the backbone must keep its shape "
                              f"(start from --config {run_dir / 'config.yaml'})")
    for new, src in ft.init_tasks.items():
        if src not in source_cfg.tasks.names:
            raise ConfigError(f"finetune.init_tasks.{new}", f"{src!r} is not a task of the source run "
                              f"({', '.join(source_cfg.tasks.names)})")
    if Path(cfg.train.out_dir).resolve() == run_dir.resolve():
        raise ConfigError("train.out_dir", f"is the source run {run_dir}: write the fine-tuned run to "
                          "another folder")
    return SourceRun(run_dir, folder, int(folder.name.split("_")[1]), source_cfg)


def finetune_ds_config(cfg: RunConfig, ds_config: dict) -> dict:
    """The DeepSpeed config a fine-tuning mode can run with.

    With every expert frozen (modes routers and heads) DeepSpeed 0.19.8's ZeRO 1/2 refuse the
    model: ``stage_1_and_2.py:_configure_moe_settings`` asserts that some optimizer group holds MoE
    parameters, and the engine drops empty groups (``engine.py:_configure_optimizer``). Those
    modes train only routers, embeddings and heads, whose optimizer state partitioning would save
    nothing worth having, so they run at stage 0, which keeps state only for what trains.
    """
    zero = ds_config.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if zero_stage(cfg, stage) != stage:
        return {**ds_config, "zero_optimization": {**zero, "stage": zero_stage(cfg, stage)}}
    return ds_config


def zero_stage(cfg: RunConfig, asked: int) -> int:
    """The ZeRO stage a run of ``cfg`` trains at when ``asked`` is configured (see finetune_ds_config)."""
    return 0 if cfg.finetune.mode in ("routers", "heads") else asked


def zero_note(cfg: RunConfig, asked: int | None = None) -> str:
    """A line telling the user their ZeRO stage (default: the run's ds_config's) was replaced, or ''."""
    from modsquad_ds.distributed.ds_config import ds_config_for_run

    if asked is None:
        asked = ds_config_for_run(cfg).get("zero_optimization", {}).get("stage", 0)
    if zero_stage(cfg, asked) != asked:
        return (f"finetune.mode {cfg.finetune.mode}: ZeRO stage {asked} -> 0 (every expert is frozen, and "
                "DeepSpeed's ZeRO 1/2 need trainable MoE parameters; see docs/finetune.md)")
    return ""


def load_source_weights(cfg: RunConfig):
    """The source checkpoint's weights (``export.reader.CheckpointWeights``), fp32, single-process naming."""
    from modsquad_ds.export.reader import load_checkpoint_weights

    return load_checkpoint_weights(cfg.finetune.init_from, step=cfg.finetune.step)
