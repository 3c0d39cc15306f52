"""A fixed fraction of a split (``data.fraction``): the few-shot subsets of the paper's transfer
experiment (Fig. 4: new tasks learned from 0.5% to 5% of the training set).

The subset is chosen once from the split's sample positions by a seed alone, so it is the same on
every rank, in every epoch and after a resume; each epoch then permutes and splits only these
samples (plan.py for shards, raw_reader.RankBatchSampler for folders). Positions are the split's
stored order: for shards the index's shards concatenated, for a raw folder the sorted sample ids.
"""

from __future__ import annotations

import random
from dataclasses import replace

from modsquad_ds.data.shard_index import ShardInfo


def subset_size(total: int, fraction: float) -> int:
    """Samples kept: ``round(fraction * total)``, at least 1."""
    return max(1, round(fraction * total))


def subset_positions(total: int, fraction: float, seed: int) -> list[int]:
    """The kept positions of a split of ``total`` samples, ascending."""
    if fraction >= 1.0:
        return list(range(total))
    return sorted(random.Random(f"fraction:{seed}").sample(range(total), subset_size(total, fraction)))


def subset_shards(shards: list[ShardInfo], fraction: float, seed: int) -> list[ShardInfo]:
    """The subset as shard pieces: one :class:`ShardInfo` per run of consecutive kept samples of a
    shard (``first`` = its offset in the tar), so the epoch plan permutes and splits them as it
    permutes whole shards. At a few percent nearly every piece is one sample: the epoch order is a
    permutation of the kept samples themselves. Reading a piece skips the samples before it in its
    tar by their 512-byte headers only (tar_reader.read_span), so samples left out cost header
    reads, not data reads."""
    if fraction >= 1.0:
        return list(shards)
    pieces: list[ShardInfo] = []
    kept = subset_positions(sum(s.samples for s in shards), fraction, seed)
    starts, pos = [], 0
    for shard in shards:
        starts.append(pos)
        pos += shard.samples
    i = 0
    for shard, start in zip(shards, starts):
        while i < len(kept) and kept[i] < start + shard.samples:
            first = kept[i]
            run = 1
            while i + run < len(kept) and kept[i + run] == first + run and first + run < start + shard.samples:
                run += 1
            pieces.append(replace(shard, samples=run, first=shard.first + first - start))
            i += run
    return pieces
