"""Entry points the trainer calls: one rank's batches for one epoch, from either source.

    loader = build_train_loader(cfg, rank, world_size, epoch, start_batch)
    for batch in loader: ...            # len(loader) batches, the same number on every rank
    loader.batches_per_epoch            # N: save (epoch, batches_consumed) to resume
    loader.corrupt_report()             # {shard: {reason: count}} seen so far
    loader.start()                      # optional: start the workers now (they begin prefetching)

Workers are not persistent: each epoch (and each resume) builds a fresh loader, which is what
makes the epoch plan, the shuffle seeds and the skip deterministic. Their start-up (forking, opening
shards, filling the shuffle buffer) can be hidden behind the previous epoch's last steps by calling
``start()`` early (the trainer does, train/epochs.py).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from modsquad_ds.data.corrupt import CorruptCounter
from modsquad_ds.data.packed import pack, unpacked
from modsquad_ds.data.plan import batches_per_rank
from modsquad_ds.data.raw_reader import RankBatchSampler, RawFolderDataset, collate_with_events, split_buildings
from modsquad_ds.data.sample import SampleProcessor
from modsquad_ds.data.shard_index import index_path, load_index
from modsquad_ds.data.subset import subset_positions, subset_shards
from modsquad_ds.data.wds_pipeline import ShardStream
from modsquad_ds.data.worker_signals import FORK, kill_workers, starting_workers, worker_init

log = logging.getLogger("modsquad_ds.data")


class EpochLoader:
    """Iterates a DataLoader's batches, strips the corrupt-sample events and counts them."""

    def __init__(self, dataloader: DataLoader, batches_per_epoch: int, start_batch: int,
                 max_corrupt: int, rank: int):
        self.dataloader = dataloader
        self.batches_per_epoch = batches_per_epoch
        self.start_batch = start_batch
        self.counter = CorruptCounter(max_corrupt, f" on rank {rank} this epoch")
        self._started = None

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    @property
    def in_flight(self) -> int:
        """Batches the workers prepare ahead of the consumer (0 without workers)."""
        return self.dataloader.num_workers * (self.dataloader.prefetch_factor or 0)

    def start(self) -> "EpochLoader":
        """Start the workers now; iterating later takes the batches they have prepared meanwhile."""
        if self._started is None:
            self._started = start_workers(self.dataloader)
        return self

    def __iter__(self):
        batches, self._started = self.start()._started, None
        with workers_killed_on_error(batches):
            for batch in batches:
                batch = unpacked(batch)
                for shard, key, reason, detail in batch.pop("_corrupt", ()):
                    self.counter.add(shard, key, reason, detail)
                yield batch
        if self.counter.total:
            log.warning("corrupt samples skipped this epoch: %s", self.counter.report())

    def corrupt_report(self) -> dict[str, dict[str, int]]:
        return self.counter.report()


def _processor(cfg, epoch: int, train: bool) -> SampleProcessor:
    d = cfg.data
    keep = {}
    if d.class_object_keep is not None:
        keep["class_object"] = tuple(d.class_object_keep)
    if d.class_scene_keep is not None:
        keep["class_scene"] = tuple(d.class_scene_keep)
    return SampleProcessor(list(cfg.tasks.names), cfg.model.img_size, seed=_seed(cfg), epoch=epoch,
                           hflip=train and d.hflip, class_keep=keep, png_decoder=d.png_decoder)


def _seed(cfg) -> int:
    return cfg.data.seed if cfg.data.seed is not None else cfg.seed


def dataloader(dataset, cfg, workers: int, collate_fn=None, **kw) -> DataLoader:
    """A DataLoader as every loader of ours (training and evaluation) is built:
    - workers forked whatever the default start method (worker_signals.FORK), ignoring stop signals
      and ending with the rank (worker_init): a SIGTERM that reaches them with the rank (Slurm,
      launchers) must not kill them before the rank has saved;
    - each batch ``collate_fn`` makes leaves its worker as one block of shared memory (data/packed.py;
      the consumer calls ``unpacked``) and, where CUDA is present, is pinned for non-blocking copies;
    - a generator of its own: DataLoader otherwise draws its workers' base seed from the global torch
      RNG, which would shift the router-noise stream whenever a loader is built (a resumed run would
      no longer equal an uninterrupted one; validation would change the training it watches).
    Start its workers with :func:`start_workers`."""
    generator = torch.Generator().manual_seed(_seed(cfg))
    kw.update(generator=generator, persistent_workers=False, pin_memory=torch.cuda.is_available())
    if not workers:
        return DataLoader(dataset, num_workers=0, collate_fn=collate_fn, **kw)
    return DataLoader(dataset, num_workers=workers, prefetch_factor=cfg.data.prefetch_factor,
                      multiprocessing_context=FORK, worker_init_fn=functools.partial(worker_init, os.getpid()),
                      collate_fn=functools.partial(_packed, collate_fn), **kw)


def start_workers(loader: DataLoader):
    """``iter(loader)``: its workers fork here, with stop signals held meanwhile (see worker_signals)."""
    with starting_workers():
        return iter(loader)


@contextlib.contextmanager
def workers_killed_on_error(batches) -> Iterator[None]:
    """Iterate ``batches`` (from :func:`start_workers`) inside this: an error that ends the loop kills
    their workers (they ignore the SIGTERM that is torch's last resort, see kill_workers)."""
    try:
        yield
    except Exception:
        kill_workers(batches)
        raise


def _packed(collate, item):
    """In a worker: the batch (``collate``'s of ``item``, or ``item`` itself) packed."""
    return pack(collate(item) if collate is not None else item)


def _check_start(start_batch: int, n: int) -> None:
    if not 0 <= start_batch <= n:
        raise ValueError(f"start_batch {start_batch} is outside [0, {n}] (batches per epoch)")


def build_shard_loader(cfg, split: str, rank: int, world_size: int, epoch: int, start_batch: int = 0,
                       train: bool = True) -> EpochLoader:
    d = cfg.data
    index = load_index(index_path(d.source_path(), split))
    missing = [x for x in _processor(cfg, epoch, False).domains if x not in index.domains]
    if missing:
        raise ValueError(f"{index.path}: shards lack domains {missing} needed by tasks.names")
    if problem := index.resolution_problem(cfg.model.img_size):  # preflight's check, for callers without it
        raise ValueError(f"model.img_size: {problem}")
    # data.fraction: training reads a fixed subset; evaluation always the whole split
    shards = subset_shards(index.shards, d.fraction, _seed(cfg)) if train else index.shards
    total = sum(s.samples for s in shards)
    n = batches_per_rank(min(total, d.samples_per_epoch or total), world_size, d.batch_size)
    _check_start(start_batch, n)
    stream = ShardStream(shards, _processor(cfg, epoch, train), seed=_seed(cfg), epoch=epoch, rank=rank,
                         world_size=world_size, batch_size=d.batch_size, num_workers=d.workers,
                         start_batch=start_batch, shuffle_buffer=d.shuffle_buffer if train else 0,
                         max_corrupt=d.max_corrupt, cap=d.samples_per_epoch)
    return EpochLoader(dataloader(stream, cfg, d.workers, batch_size=None), n, start_batch, d.max_corrupt, rank)


def build_raw_loader(cfg, split: str, rank: int, world_size: int, epoch: int, start_batch: int = 0,
                     train: bool = True, dataset: RawFolderDataset | None = None) -> EpochLoader:
    """``dataset`` may be passed in to reuse one folder scan across epochs."""
    d = cfg.data
    proc = _processor(cfg, epoch, train)
    if dataset is None:
        dataset = RawFolderDataset(Path(d.raw_root or d.source_path()), proc,
                                   split_buildings(d.split_csv, split))
    else:
        dataset.processor = proc
    subset = subset_positions(len(dataset), d.fraction, _seed(cfg)) if train and d.fraction < 1 else None
    sampler = RankBatchSampler(len(dataset), seed=_seed(cfg), epoch=epoch, rank=rank, world_size=world_size,
                               batch_size=d.batch_size, start_batch=start_batch, shuffle=train,
                               cap=d.samples_per_epoch, subset=subset)
    _check_start(start_batch, sampler.n_batches)
    dl = dataloader(dataset, cfg, d.workers, collate_with_events, batch_sampler=sampler)
    return EpochLoader(dl, sampler.n_batches, start_batch, d.max_corrupt, rank)


def build_train_loader(cfg, rank: int, world_size: int, epoch: int, start_batch: int = 0) -> EpochLoader:
    """Training batches of ``data.train_split`` from the configured source."""
    build = build_shard_loader if cfg.data.source == "shards" else build_raw_loader
    return build(cfg, cfg.data.train_split, rank, world_size, epoch, start_batch, train=True)


def build_eval_loader(cfg, rank: int, world_size: int, split: str | None = None) -> EpochLoader:
    """Evaluation batches (no flip, no sample shuffle); equal counts per rank, so the last
    ``< world_size * batch_size`` samples of the permuted split are left out."""
    build = build_shard_loader if cfg.data.source == "shards" else build_raw_loader
    return build(cfg, split or cfg.data.val_split, rank, world_size, 0, 0, train=False)
