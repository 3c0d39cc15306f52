"""The ``data`` section of the run configuration (owned by modsquad_ds.data)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    """Where samples come from and how they are batched."""

    batch_size: int = 8
    """Images per rank per micro step; every image carries every task."""

    def __post_init__(self):
        from modsquad_ds.config.schema import ConfigError

        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {self.batch_size}")
