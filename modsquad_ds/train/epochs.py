"""The trainer's batches across epochs, with the next epoch's loader started ahead of time.

Each epoch builds a fresh loader (data/loader.py: that is what keeps epochs and resumes exact), and
a fresh loader costs its start-up before the first batch: forking workers, opening shards, filling
the shuffle buffer. With a small epoch that is a large share of the run (the demo's 15-step epochs
waited for data 13-18% of the time, docs/benchmarks.md). So the next epoch's loader is built and
started when the current one has no more batches to prepare, only prepared ones to hand over: from
then on its workers are idle, and the new ones take their place instead of competing with them.
Same loaders, same order, same batches: only earlier.
"""

from __future__ import annotations

from typing import Callable, Iterator

from modsquad_ds.data.loader import EpochLoader

BuildLoader = Callable[[int, int], EpochLoader]
"""``(epoch, start_batch) -> loader``."""


def epoch_batches(build: BuildLoader, epoch: int, start_batch: int) -> Iterator[tuple[EpochLoader, int, dict]]:
    """``(loader, epoch, batch)`` from ``epoch``'s batch ``start_batch`` on, epoch after epoch, forever.

    The next epoch's loader starts once the current one has at most ``in_flight`` batches left.
    """
    loader, following = build(epoch, start_batch), None
    while True:
        remaining = len(loader)
        for batch in loader:
            remaining -= 1
            if following is None and remaining <= loader.in_flight:
                following = build(epoch + 1, 0).start()
            yield loader, epoch, batch
        if following is None:  # an epoch shorter than one batch in flight, or without workers
            following = build(epoch + 1, 0)
        loader, following, epoch = following, None, epoch + 1
