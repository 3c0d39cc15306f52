"""The ``train`` section of the run configuration (owned by modsquad_ds.train)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    """Optimisation and run control."""

    lr: float = 2e-4
    """Base learning rate (paper: 2e-4 with AdamW, weight decay 0.05, cosine decay)."""
    weight_decay: float = 0.05

    def __post_init__(self):
        from modsquad_ds.config.schema import ConfigError

        if self.lr <= 0:
            raise ConfigError("lr", f"must be positive, got {self.lr}")
