"""Load a DeepSpeed JSON from ds_configs/, apply the run's overrides, refuse what cannot work.

The JSONs are world-size independent: they give ``train_micro_batch_size_per_gpu`` and
``gradient_accumulation_steps`` and DeepSpeed derives the global batch from the world size. A JSON
that sets ``train_batch_size`` would tie it to one world size (DeepSpeed asserts
train_batch_size == micro x accum x world), so it is refused. The optimizer and schedule come from
the run config (the trainer builds AdamW with MoE parameter groups), so JSON ``optimizer`` and
``scheduler`` sections are refused too: one source of truth for lr. Errors are one line:
``<file>:<json key>: <what is wrong>``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from modsquad_ds.config.schema import ConfigError
from modsquad_ds.distributed.parallel import ZERO3_REFUSAL

if TYPE_CHECKING:
    from modsquad_ds.config.schema import RunConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_DIR = REPO_ROOT / "ds_configs"

_REFUSED = {
    "train_batch_size": "must not be set: it fixes the world size; give "
                        "train_micro_batch_size_per_gpu and gradient_accumulation_steps",
    "optimizer": "must not be set: the trainer builds AdamW from train.lr and train.weight_decay "
                 "(with DeepSpeed MoE parameter groups)",
    "scheduler": "must not be set: the trainer schedules lr from train.warmup_steps and train.steps",
}


def resolve_path(path: str | Path) -> Path:
    """``path`` as given if it exists (absolute or from the working directory), else from the
    repository root, so ``ds_configs/zero2_bf16.json`` works from any directory."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_absolute() and (REPO_ROOT / path).is_file():
        return REPO_ROOT / path
    raise ConfigError("train.ds_config", f"file not found: {path} (looked in the working directory "
                      f"and {REPO_ROOT})")


def load_ds_config(path: str | Path, *, micro_batch: Optional[int] = None,
                   grad_accum: Optional[int] = None, grad_clip: Optional[float] = None,
                   precision: Optional[str] = None, zero_stage: Optional[int] = None,
                   moe: bool = True) -> dict:
    """Read ``path``, apply the overrides that are not None, validate, return the dict to hand to
    ``deepspeed.initialize(config=...)``. ``moe``: the model has DeepSpeed MoE layers."""
    resolved = resolve_path(path)
    try:
        config = json.loads(resolved.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(str(path), f"not valid JSON: {err.msg} at line {err.lineno}") from None
    if not isinstance(config, dict):
        raise ConfigError(str(path), "must hold a JSON object at the top level")
    validate(config, str(path), moe)  # the file as written, so errors blame the file, not an override
    config = apply_overrides(config, micro_batch=micro_batch, grad_accum=grad_accum,
                             grad_clip=grad_clip, precision=precision, zero_stage=zero_stage)
    validate(config, f"{path} with overrides", moe)
    return config


def apply_overrides(config: dict, *, micro_batch: Optional[int] = None, grad_accum: Optional[int] = None,
                    grad_clip: Optional[float] = None, precision: Optional[str] = None,
                    zero_stage: Optional[int] = None) -> dict:
    out = copy.deepcopy(config)
    if micro_batch is not None:
        out["train_micro_batch_size_per_gpu"] = micro_batch
    if grad_accum is not None:
        out["gradient_accumulation_steps"] = grad_accum
    if grad_clip is not None:
        out["gradient_clipping"] = grad_clip
    if precision is not None:
        out.setdefault("bf16", {})["enabled"] = precision == "bf16"
    if zero_stage is not None:
        out.setdefault("zero_optimization", {})["stage"] = zero_stage
    return out


def validate(config: dict, source: str, moe: bool = True) -> None:
    """Refuse settings that are wrong for this project before DeepSpeed sees them."""

    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{source}:{key}", message)

    for key, why in _REFUSED.items():
        if key in config:
            fail(key, why)
    _positive_int(config, "train_micro_batch_size_per_gpu", fail, required=True)
    _positive_int(config, "gradient_accumulation_steps", fail, required=False)
    clip = config.get("gradient_clipping", 0.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0:
        fail("gradient_clipping", f"must be a number >= 0 (0: off), got {clip!r}")
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        fail("zero_optimization", f"must be an object, got {zero!r}")
    stage = zero.get("stage", 0)
    if stage == 3:
        fail("zero_optimization.stage", f"3 is refused: {ZERO3_REFUSAL}; use 0, 1 or 2")
    if stage not in (0, 1, 2) or isinstance(stage, bool):
        fail("zero_optimization.stage", f"must be 0, 1 or 2, got {stage!r}")
    for section in ("fp16", "bf16"):
        value = config.get(section, {})
        if not isinstance(value, dict) or not isinstance(value.get("enabled", False), bool):
            fail(f"{section}.enabled", f"must be true or false inside an object, got {value!r}")
    if config.get("fp16", {}).get("enabled", False):
        fail("fp16.enabled", "fp16 is not supported (no loss scaling for MoE here, no fp16 on CPU): "
             "use train.precision bf16 or fp32")
    if moe and stage == 0 and config.get("bf16", {}).get("enabled", False) and clip > 0:
        # Measured (tests/distributed/test_ds_config_engines.py history, DeepSpeed 0.19.8): without ZeRO,
        # bf16 runs through FP16_UnfusedOptimizer, whose clipping norm came out equal to the norm of
        # the dense gradients alone (931.6 vs 976.8 with the expert gradients), so the step exceeded
        # the limit by 4.8 %: its step() computes the expert groups' norms but clips with
        # get_global_norm(norm_groups), the shared ones only. ZeRO 1 and 2 in bf16 clip exactly.
        fail("zero_optimization.stage", "bf16 at ZeRO stage 0 with gradient_clipping leaves expert "
             "gradients out of the clipping norm (DeepSpeed 0.19.8 FP16_UnfusedOptimizer): use ZeRO stage 1 "
             "or 2 for bf16 (ds_configs/zero1_bf16.json, zero2_bf16.json), or gradient_clipping 0")


def _positive_int(config: dict, key: str, fail, required: bool) -> None:
    if key not in config:
        if required:
            fail(key, "is required (the per-rank batch; DeepSpeed derives the global batch)")
        return
    value: Any = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        fail(key, f"must be an integer >= 1, got {value!r}")


def ds_config_for_run(cfg: "RunConfig") -> dict:
    """The DeepSpeed dict of a run: train.ds_config with data.batch_size as the micro batch and the
    train.* overrides that are set."""
    t = cfg.train
    return load_ds_config(t.ds_config, micro_batch=cfg.data.batch_size, grad_accum=t.grad_accum,
                          grad_clip=t.grad_clip, precision=t.precision, zero_stage=t.zero_stage,
                          moe=cfg.moe.mlp.enabled)


def save_ds_config(config: dict, path: str | Path) -> None:
    """Write the resolved dict into the run folder, next to the resolved run config."""
    Path(path).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def shipped_configs() -> list[Path]:
    return sorted(SHIPPED_DIR.glob("*.json"))
