"""Evaluation batches: every sample of a split exactly once over all ranks, equal batch counts.

The training loader drops the last ``< world * batch`` samples so ranks stay in step; an evaluation
must not (its numbers would change with the world size). Here the split's positions 0..T-1 (shards
in index order, or the raw folder's sorted sample ids) are cut into ``world`` contiguous chunks of
``ceil(T / world)``; each rank batches its chunk and pads with weight-0 copies, so every rank runs
``ceil(ceil(T / world) / batch)`` batches of exactly ``batch`` images. Expert-parallel layers need
that: every rank of a group must call every MoE layer the same number of times. Padding samples
count nowhere (metric sums and usage take the weight).

Corrupt samples are skipped with weight 0 and counted in ``batch["corrupt"]``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from modsquad_ds.data.loader import _processor, dataloader
from modsquad_ds.data.plan import spans_for_range, worker_batches
from modsquad_ds.data.raw_reader import RawFolderDataset, split_buildings
from modsquad_ds.data.sample import SampleError, collate
from modsquad_ds.data.shard_index import index_path, load_index
from modsquad_ds.data.tar_reader import Corrupt, read_span


def split_size(cfg, split: str) -> int:
    d = cfg.data
    if d.source == "shards":
        return load_index(index_path(d.source_path(), split)).num_samples
    return len(_raw_dataset(cfg, split))


def _raw_dataset(cfg, split: str) -> RawFolderDataset:
    d = cfg.data
    return RawFolderDataset(Path(d.raw_root or d.source_path()), _processor(cfg, 0, False),
                            split_buildings(d.split_csv, split))


def rank_chunk(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of this rank's positions."""
    per = math.ceil(total / world_size)
    start = min(total, rank * per)
    return start, min(total, start + per)


def batches_per_rank(total: int, world_size: int, batch_size: int) -> int:
    return max(1, math.ceil(math.ceil(total / world_size) / batch_size))


class EvalStream(IterableDataset):
    """One rank's evaluation batches; DataLoader workers take contiguous runs of batches."""

    def __init__(self, cfg, split: str, rank: int, world_size: int, max_samples: Optional[int] = None):
        super().__init__()
        self.cfg, self.split = cfg, split
        self.processor = _processor(cfg, 0, False)
        d = cfg.data
        if d.source == "shards":
            self.shards = load_index(index_path(d.source_path(), split)).shards
            total = sum(s.samples for s in self.shards)
        else:
            self.shards = None
            total = len(_raw_dataset(cfg, split))
        self.split_total = total
        self.total = min(total, max_samples) if max_samples else total
        if self.total == 0:
            raise ValueError(f"split {split!r} has no samples")
        self.start, self.end = rank_chunk(self.total, rank, world_size)
        self.batch_size = d.batch_size
        self.n_batches = batches_per_rank(self.total, world_size, self.batch_size)
        self.num_workers = d.workers

    def _samples(self, start: int, count: int) -> Iterator:
        """(sample dict | None for corrupt) for positions [start, start + count)."""
        if count <= 0:
            return
        if self.shards is not None:
            domains = set(self.processor.domains)
            for span in spans_for_range(self.shards, start, count):
                for item in read_span(span.shard.path, span.shard.name, span.first, span.count, domains):
                    if isinstance(item, Corrupt):
                        yield None
                        continue
                    try:
                        yield self.processor.finish(self.processor.load(item.key, item.files))
                    except SampleError:
                        yield None
        else:
            dataset = _raw_dataset(self.cfg, self.split)
            for i in range(start, start + count):
                try:
                    yield self.processor.finish(dataset.load(i))
                except SampleError:
                    yield None

    def _filler(self) -> dict:
        """A real sample (position 0 of the split) to pad with when a batch has none of its own."""
        for sample in self._samples(0, self.total):
            if sample is not None:
                return sample
        raise ValueError(f"split {self.split!r} has no usable sample")

    def _batch(self, samples: list, filler: Optional[dict]) -> dict:
        real = [s for s in samples if s is not None]
        corrupt = len(samples) - len(real)
        pad = real[0] if real else filler
        weight = torch.zeros(self.batch_size)
        weight[:len(real)] = 1.0
        batch = collate(real + [pad] * (self.batch_size - len(real)))
        batch["weight"] = weight
        batch["corrupt"] = corrupt
        return batch

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        counts = worker_batches(self.n_batches, workers)
        first_batch = sum(counts[:worker])
        lo = min(self.end, self.start + first_batch * self.batch_size)
        hi = min(self.end, self.start + (first_batch + counts[worker]) * self.batch_size)
        stream = self._samples(lo, hi - lo)
        filler = None
        for _ in range(counts[worker]):
            samples = [s for _, s in zip(range(self.batch_size), stream)]
            if not any(s is not None for s in samples) and filler is None:
                filler = self._filler()
            yield self._batch(samples, filler)


def eval_loader(cfg, split: str, rank: int, world_size: int, max_samples: Optional[int] = None) -> DataLoader:
    """This rank's evaluation batches, packed: iterate ``start_workers(loader)`` inside
    ``workers_killed_on_error`` and ``unpacked`` each batch (data/loader.py), as the training loader."""
    stream = EvalStream(cfg, split, rank, world_size, max_samples)
    w = min(cfg.data.workers, stream.n_batches)
    loader = dataloader(stream, cfg, w, batch_size=None)
    loader.n_batches = stream.n_batches  # type: ignore[attr-defined]
    loader.total = stream.total  # type: ignore[attr-defined]
    loader.split_total = stream.split_total  # type: ignore[attr-defined]
    return loader
