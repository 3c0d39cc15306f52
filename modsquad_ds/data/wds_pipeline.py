"""The WebDataset streaming pipeline run inside each DataLoader worker.

Stages (each a generator, testable on its own):
    read spans of shards (plan.py decides which) -> shuffle buffer (seeded) -> decode + validate
    -> fill the worker's quota (cycling over its span if corrupt samples left it short)
    -> skip the batches a resumed run already saw -> resize / flip -> batch (no partial batches)

Corrupt samples become events that travel with the next batch (``batch["_corrupt"]``) to the
main process, which counts them per shard (see loader.EpochLoader).
"""

from __future__ import annotations

import itertools
from typing import Iterator

from torch.utils.data import IterableDataset, get_worker_info
from webdataset.filters import shuffle as wds_shuffle

from modsquad_ds.data.corrupt import CorruptCounter, CorruptDataError
from modsquad_ds.data.plan import WorkerPlan, worker_plan
from modsquad_ds.data.sample import SampleError, SampleProcessor, collate
from modsquad_ds.data.shard_index import ShardInfo
from modsquad_ds.data.tar_reader import Corrupt, read_span


def read_plan(plan: WorkerPlan, domains: set[str]) -> Iterator:
    for span in plan.spans:
        yield from read_span(span.shard.path, span.shard.name, span.shard.first + span.first, span.count, domains)


def decode_stage(items, processor: SampleProcessor) -> Iterator:
    """RawSample -> ("ok", prepared); anything unusable -> Corrupt."""
    for item in items:
        if isinstance(item, Corrupt):
            yield item
            continue
        try:
            yield ("ok", processor.load(item.key, item.files))
        except SampleError as err:
            yield Corrupt(item.shard, item.key, err.reason, str(err))


def fill_quota(make_pass, quota: int) -> Iterator:
    """Yield ``quota`` valid samples from passes over the worker's span; corrupt events of the
    first pass only (later passes repeat the same damage)."""
    if quota <= 0:
        return
    delivered = 0
    for pass_index in itertools.count():
        got = 0
        for item in make_pass(pass_index):
            if isinstance(item, Corrupt):
                if pass_index == 0:
                    yield item
                continue
            yield item
            got += 1
            delivered += 1
            if delivered >= quota:
                return
        if got == 0:
            raise CorruptDataError("no usable sample in this worker's shards; check them with "
                                   "python -m data_tools.verify_shards")


def skip_and_batch(items, processor: SampleProcessor, batch_size: int, skip_samples: int) -> Iterator[dict]:
    events, samples, seen = [], [], 0
    for item in items:
        if isinstance(item, Corrupt):
            events.append(item)
            continue
        seen += 1
        if seen <= skip_samples:  # already consumed before the interruption
            continue
        samples.append(processor.finish(item[1]))
        if len(samples) == batch_size:
            batch = collate(samples)
            batch["_corrupt"] = [(e.shard, e.key, e.reason, e.detail) for e in events]
            yield batch
            events, samples = [], []


class ShardStream(IterableDataset):
    """One rank's batches for one epoch (or the rest of it, from ``start_batch``)."""

    def __init__(self, shards: list[ShardInfo], processor: SampleProcessor, *, seed: int, epoch: int,
                 rank: int, world_size: int, batch_size: int, num_workers: int, start_batch: int,
                 shuffle_buffer: int, max_corrupt: int, cap: int | None = None):
        super().__init__()
        self.shards, self.processor = shards, processor
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.batch_size, self.num_workers, self.start_batch = batch_size, num_workers, start_batch
        self.shuffle_buffer, self.max_corrupt, self.cap = shuffle_buffer, max_corrupt, cap

    def plan(self, physical: int) -> WorkerPlan:
        return worker_plan(self.shards, seed=self.seed, epoch=self.epoch, rank=self.rank,
                           world_size=self.world_size, batch_size=self.batch_size,
                           num_workers=self.num_workers, physical=physical, start_batch=self.start_batch,
                           cap=self.cap)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        plan = self.plan(info.id if info is not None else 0)
        domains = set(self.processor.domains)

        def make_pass(pass_index: int):
            raw = iter(read_plan(plan, domains))
            if self.shuffle_buffer > 1:
                seed = f"samples:{self.seed}:{self.epoch}:{self.rank}:{plan.logical}:{pass_index}"
                raw = wds_shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 16), seed=seed)(raw)
            return decode_stage(raw, self.processor)

        # A worker-local limit too, so a worker that never completes a batch still stops.
        guard = CorruptCounter(self.max_corrupt, f" in worker {plan.logical} of rank {self.rank}",
                               log_first=False)

        def guarded(items):
            for item in items:
                if isinstance(item, Corrupt):
                    guard.add(item.shard, item.key, item.reason, item.detail)
                yield item

        stream = guarded(fill_quota(make_pass, plan.n_samples))
        return skip_and_batch(stream, self.processor, self.batch_size, plan.skip_batches * self.batch_size)
