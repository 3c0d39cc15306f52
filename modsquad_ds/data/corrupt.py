"""Counting and limiting corrupt input, per shard."""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict

log = logging.getLogger("modsquad_ds.data")


class CorruptDataError(RuntimeError):
    """Too much corrupt input: the message names the shard where the limit was crossed."""


class CorruptCounter:
    """Per-shard, per-reason counts; raises once the total passes ``limit``. Logs as skips happen:
    the first at once, then at most one line per ``log_interval_s`` (a damaged data set must not
    flood the log with a line per sample or per shard)."""

    def __init__(self, limit: int, where: str = "", log_first: bool = True, log_interval_s: float = 10.0):
        self.limit = limit
        self.where = where
        self.log_first = log_first
        self.log_interval_s = log_interval_s
        self.by_shard: dict[str, Counter] = defaultdict(Counter)
        self.total = 0
        self._logged_total, self._last_log = 0, -float("inf")

    def add(self, shard: str, key: str, reason: str, detail: str) -> None:
        self.by_shard[shard][reason] += 1
        self.total += 1
        now = time.monotonic()
        if self.log_first and now - self._last_log >= self.log_interval_s:
            unlogged = self.total - self._logged_total - 1
            log.warning("skipped a sample%s: shard %s: %s%s", self.where, shard, detail,
                        f" (and {unlogged} more since the last line)" if unlogged else "")
            self._logged_total, self._last_log = self.total, now
        if self.total > self.limit:
            raise CorruptDataError(
                f"{self.total} corrupt samples{self.where} exceed data.max_corrupt={self.limit}; "
                f"last in shard {shard}: {reason}: {detail}")

    def report(self) -> dict[str, dict[str, int]]:
        return {shard: dict(c) for shard, c in sorted(self.by_shard.items())}
