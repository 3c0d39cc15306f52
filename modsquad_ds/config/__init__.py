"""Run configuration: schema, presets, YAML loading with ``--set`` overrides."""

from modsquad_ds.config.loader import load_config, parse_override, save_config, to_dict
from modsquad_ds.config.presets import PRESETS
from modsquad_ds.config.schema import (
    ConfigError, ExpertsConfig, LossConfig, ModelConfig, MoEConfig, RunConfig, TasksConfig,
)

__all__ = [
    "ConfigError", "ExpertsConfig", "LossConfig", "ModelConfig", "MoEConfig", "PRESETS",
    "RunConfig", "TasksConfig", "load_config", "parse_override", "save_config", "to_dict",
]
