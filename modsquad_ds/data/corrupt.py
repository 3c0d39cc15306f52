"""Counting and limiting corrupt input, per shard."""

from __future__ import annotations

import logging
from collections import Counter, defaultdict

log = logging.getLogger("modsquad_ds.data")


class CorruptDataError(RuntimeError):
    """Too much corrupt input: the message names the shard where the limit was crossed."""


class CorruptCounter:
    """Per-shard, per-reason counts; raises once the total passes ``limit``."""

    def __init__(self, limit: int, where: str = "", log_first: bool = True):
        self.limit = limit
        self.where = where
        self.log_first = log_first
        self.by_shard: dict[str, Counter] = defaultdict(Counter)
        self.total = 0

    def add(self, shard: str, key: str, reason: str, detail: str) -> None:
        self.by_shard[shard][reason] += 1
        self.total += 1
        if self.log_first and self.by_shard[shard][reason] == 1:  # once per shard and reason, not once per sample
            log.warning("corrupt input in %s (%s): %s", shard, reason, detail)
        if self.total > self.limit:
            raise CorruptDataError(
                f"{self.total} corrupt samples{self.where} exceed data.max_corrupt={self.limit}; "
                f"last in shard {shard}: {reason}: {detail}")

    def report(self) -> dict[str, dict[str, int]]:
        return {shard: dict(c) for shard, c in sorted(self.by_shard.items())}
