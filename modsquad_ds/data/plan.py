"""Epoch planning: which samples each rank and worker reads, so that every rank gets the same
number of batches and a run resumes mid-epoch at exactly the next batch.

The plan is pure arithmetic on the index's sample counts (testable without processes):
1. Shards are permuted with a seed derived from (seed, epoch): identical on every rank.
2. The permuted shards, concatenated, give the epoch's sample positions 0..T-1.
3. Every rank gets N = T // (world * batch) batches: rank r owns positions [r N B, (r+1) N B).
   The last T - world N B samples (fewer than world * batch) sit out this epoch; a different set
   each epoch, because the permutation changes.
4. Within a rank, logical worker l owns a contiguous run of n_l = N // W + (l < N % W) batches.
   PyTorch's DataLoader takes batches from workers round-robin, so global batch i of the rank is
   batch i // W of logical worker i % W.
5. Resuming at batch b: logical worker l skips the s_l of its batches that came before b, and
   physical worker p plays logical worker (p + b) % W, so the round-robin restarts at the right
   worker. The resume state is (epoch, batches_consumed), nothing else.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from modsquad_ds.data.shard_index import ShardInfo


def epoch_shard_order(shards: list[ShardInfo], seed: int, epoch: int) -> list[ShardInfo]:
    order = list(shards)
    random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    return order


def batches_per_rank(total_samples: int, world_size: int, batch_size: int) -> int:
    n = total_samples // (world_size * batch_size)
    if n == 0:
        raise ValueError(f"the split has {total_samples} samples, fewer than world_size ({world_size}) x "
                         f"batch_size ({batch_size}): not one full batch per rank")
    return n


def worker_batches(n_batches: int, num_workers: int) -> list[int]:
    w = max(1, num_workers)
    return [n_batches // w + (1 if i < n_batches % w else 0) for i in range(w)]


def skipped_batches(start_batch: int, logical: int, num_workers: int) -> int:
    """How many of logical worker ``logical``'s batches come before the rank's batch ``start_batch``."""
    w = max(1, num_workers)
    return 0 if start_batch <= logical else (start_batch - logical + w - 1) // w


def logical_worker(physical: int, start_batch: int, num_workers: int) -> int:
    return (physical + start_batch) % max(1, num_workers)


@dataclass(frozen=True)
class ReadSpan:
    """Samples [first, first + count) of one shard, in its stored order."""

    shard: ShardInfo
    first: int
    count: int


def spans_for_range(order: list[ShardInfo], start: int, length: int) -> list[ReadSpan]:
    """The shard pieces covering epoch positions [start, start + length)."""
    spans, pos, end = [], 0, start + length
    for shard in order:
        lo, hi = max(start, pos), min(end, pos + shard.samples)
        if lo < hi:
            spans.append(ReadSpan(shard, lo - pos, hi - lo))
        pos += shard.samples
        if pos >= end:
            break
    return spans


@dataclass(frozen=True)
class WorkerPlan:
    """Everything one (rank, logical worker) needs to produce its batches for an epoch."""

    rank: int
    logical: int
    spans: tuple[ReadSpan, ...]
    n_batches: int
    skip_batches: int
    batch_size: int

    @property
    def n_samples(self) -> int:
        return self.n_batches * self.batch_size


def worker_plan(shards: list[ShardInfo], *, seed: int, epoch: int, rank: int, world_size: int,
                batch_size: int, num_workers: int, physical: int, start_batch: int = 0,
                cap: int | None = None) -> WorkerPlan:
    """``cap``: use only the first ``cap`` positions of the epoch (a different subset each epoch)."""
    order = epoch_shard_order(shards, seed, epoch)
    total = sum(s.samples for s in shards)
    n = batches_per_rank(min(total, cap) if cap else total, world_size, batch_size)
    counts = worker_batches(n, num_workers)
    logical = logical_worker(physical, start_batch, num_workers)
    start = rank * n * batch_size + batch_size * sum(counts[:logical])
    spans = spans_for_range(order, start, counts[logical] * batch_size)
    return WorkerPlan(rank, logical, tuple(spans), counts[logical],
                      skipped_batches(start_batch, logical, num_workers), batch_size)
