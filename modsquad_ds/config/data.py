"""The ``data`` section of the run configuration (owned by modsquad_ds.data)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


@dataclass
class DataConfig:
    """Where samples come from and how they are batched.

    Two sources produce identical batches: ``shards`` (WebDataset tars + index written by
    ``python -m data_tools.make_shards``) and ``raw`` (a folder in the Taskonomy release layout).
    Resuming mid-epoch needs only (epoch, batches consumed), with this section unchanged.
    """

    batch_size: int = 8
    """Images per rank per micro step; every image carries every task."""
    source: Literal["shards", "raw"] = "shards"
    """shards: stream tar shards (the scalable path); raw: read the release folder layout."""
    shards_dir: Optional[str] = None
    """Folder holding ``{split}.index.json`` and its shards (source: shards)."""
    raw_root: Optional[str] = None
    """Root of a raw release copy: ``{raw_root}/{domain}/taskonomy/{building}/...`` (source: raw)."""
    split_csv: Optional[str] = None
    """Release split CSV (``id,train,val,test``) choosing buildings for the raw source; null: all."""
    train_split: str = "train"
    val_split: str = "val"
    workers: int = 2
    """DataLoader worker processes per rank (0: read in the training process)."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead."""
    shuffle_buffer: int = 256
    """Samples held per worker for shuffling (raw bytes of the needed domains: ~2 MB each at 512 px)."""
    seed: Optional[int] = None
    """Seed of shard permutation, sample shuffle and flips; null: the run's top-level seed."""
    hflip: bool = True
    """Random horizontal flips in training (normals' x is negated with the image)."""
    max_corrupt: int = 100
    """Corrupt samples tolerated per rank and epoch (skipped and reported per shard); one more stops the run."""
    fraction: float = 1.0
    """Train on a fixed, seeded subset of this share of the training split (0 < f <= 1), the same
    samples every epoch and on every rank (the paper learns new tasks from 0.5% to 5% of the data)."""
    samples_per_epoch: Optional[int] = None
    """Use at most this many samples per epoch (all ranks together); null: the whole split."""
    png_decoder: Literal["pil", "torchvision"] = "pil"
    """PNG decoder of the loader workers: pil, or torchvision (libpng; same arrays, less CPU per
    sample at 512 px: docs/benchmarks.md)."""
    class_object_keep: Optional[list[int]] = None
    """The 100 ImageNet indices kept for class_object; null: 0, 10, ..., 990 (see data/classes.py)."""
    class_scene_keep: Optional[list[int]] = None
    """The 63 Places365 indices kept for class_scene; null: floor(i * 365 / 63), i < 63."""

    def __post_init__(self):
        from modsquad_ds.config.schema import ConfigError

        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.source not in ("shards", "raw"):
            raise ConfigError("source", f"must be 'shards' or 'raw', got {self.source!r}")
        if self.workers < 0:
            raise ConfigError("workers", f"must be >= 0, got {self.workers}")
        if self.prefetch_factor < 1:
            raise ConfigError("prefetch_factor", f"must be >= 1, got {self.prefetch_factor}")
        if self.shuffle_buffer < 0:
            raise ConfigError("shuffle_buffer", f"must be >= 0 (0 or 1: no shuffle), got {self.shuffle_buffer}")
        if self.png_decoder not in ("pil", "torchvision"):
            raise ConfigError("png_decoder", f"must be 'pil' or 'torchvision', got {self.png_decoder!r}")
        if self.max_corrupt < 0:
            raise ConfigError("max_corrupt", f"must be >= 0, got {self.max_corrupt}")
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError("fraction", f"must be in (0, 1], got {self.fraction}")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ConfigError("samples_per_epoch", f"must be >= 1 or null, got {self.samples_per_epoch}")
        for key, task, n, channels in (("class_object_keep", "class_object", 1000, 100),
                                       ("class_scene_keep", "class_scene", 365, 63)):
            keep = getattr(self, key)
            if keep is None:
                continue
            if len(keep) != channels:
                raise ConfigError(key, f"lists {len(keep)} indices; {task} has {channels} classes")
            if len(set(keep)) != len(keep):
                raise ConfigError(key, "lists an index twice")
            bad = [i for i in keep if not 0 <= i < n]
            if bad:
                raise ConfigError(key, f"indices {bad[:5]} are outside [0, {n})")

    def source_path(self) -> str:
        """The configured location for the chosen source, or a ConfigError naming the key."""
        from modsquad_ds.config.schema import ConfigError

        if self.source == "shards":
            if not self.shards_dir:
                raise ConfigError("data.shards_dir", "must be set when data.source is 'shards'")
            return self.shards_dir
        if not self.raw_root:
            raise ConfigError("data.raw_root", "must be set when data.source is 'raw'")
        return self.raw_root
