"""Samples the loader skipped (corrupt, undecodable, wrong size): counted over all ranks, reported
as they happen, logged with the metrics, summed up at the end of the run.

The loader (``data/loader.EpochLoader``) counts skips per shard and reason on each rank and warns
on that rank (rate limited, ``data/corrupt.CorruptCounter``); this tally turns them into run-wide
numbers:
- ``data/skipped`` (all ranks, this invocation) in metrics.jsonl and TensorBoard at every logged step;
- a line from rank 0 when the count grows, at most every ``interval_s`` seconds;
- :meth:`summary`: per shard and reason, gathered from every rank, for the end-of-run lines.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict

import torch.distributed as dist

from modsquad_ds.distributed.collectives import all_reduce_scalar, is_distributed


class SkipTally:
    def __init__(self, interval_s: float = 30.0):
        self.interval_s = interval_s
        self.by_shard: dict[str, Counter] = defaultdict(Counter)
        self._loader = None
        self._seen_in_loader = 0
        self.local_total = 0
        self.global_total = 0
        self._reported_total = 0
        self._last_report = -float("inf")

    def observe(self, loader) -> None:
        """After each batch of ``loader`` (one per epoch: each counts from zero)."""
        if loader is not self._loader:
            self._fold()
            self._loader, self._seen_in_loader = loader, 0
        total = loader.counter.total
        self.local_total += total - self._seen_in_loader
        self._seen_in_loader = total

    def _fold(self) -> None:
        if self._loader is not None:
            for shard, reasons in self._loader.counter.report().items():
                self.by_shard[shard].update(reasons)
            self._loader = None

    def sync(self) -> int:
        """All ranks (a collective): the run-wide count so far."""
        self.global_total = int(all_reduce_scalar(float(self.local_total), op="sum"))
        return self.global_total

    def due_message(self, step: int) -> str | None:
        """Rank 0's line after :meth:`sync`, when the count grew and the last line is old enough."""
        if self.global_total == self._reported_total:
            return None
        now = time.monotonic()
        if now - self._last_report < self.interval_s:
            return None
        new = self.global_total - self._reported_total
        self._reported_total, self._last_report = self.global_total, now
        return (f"step {step}: {new} more samples skipped as unusable ({self.global_total} so far, all ranks); "
                "the rank logs name the shards, the run summary lists them")

    def summary(self) -> dict[str, dict[str, int]]:
        """All ranks (a collective): {shard: {reason: count}} over the whole invocation."""
        self._fold()
        mine = {shard: dict(c) for shard, c in self.by_shard.items()}
        parts = [mine]
        if is_distributed():
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, mine)
        total: dict[str, Counter] = defaultdict(Counter)
        for part in parts:
            for shard, reasons in part.items():
                total[shard].update(reasons)
        return {shard: dict(c) for shard, c in sorted(total.items())}


def describe(summary: dict[str, dict[str, int]], limit: int = 5) -> str:
    """One line: ``7 samples skipped: train-000003.tar (shape mismatch 5), ...``."""
    count = sum(sum(r.values()) for r in summary.values())
    parts = [f"{shard} ({', '.join(f'{reason} {n}' for reason, n in reasons.items())})"
             for shard, reasons in list(summary.items())[:limit]]
    more = f", and {len(summary) - limit} more shards" if len(summary) > limit else ""
    return f"{count} samples skipped as unusable: {', '.join(parts)}{more}"
