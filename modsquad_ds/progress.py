"""Progress of long loops where their output goes: a live tqdm bar on a terminal, plain lines in a
file. A bar drawn into a file (a Slurm job's output, a redirected run) is a carriage return per
update, one line growing for the whole loop; there a line every ``LINE_EVERY_S`` seconds serves."""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, Optional, TypeVar

from tqdm import tqdm

T = TypeVar("T")

LINE_EVERY_S = 30.0
"""Progress written to a file: one line at most this often (and one at the end)."""


def track(items: Iterable[T], *, desc: str, total: Optional[int] = None, unit: str = "it", enabled: bool = True,
          interactive: Optional[bool] = None, every_s: float = LINE_EVERY_S) -> Iterable[T]:
    """``items`` with progress shown on stderr: a tqdm bar when stderr is a terminal (``interactive``
    overrides the check), else plain lines; nothing when not ``enabled``."""
    if not enabled:
        return items
    if on_terminal(interactive):
        return tqdm(items, total=total, desc=desc, unit=unit, dynamic_ncols=True)
    return _lines(items, desc, total, unit, every_s)


def on_terminal(interactive: Optional[bool] = None) -> bool:
    """Whether progress goes to a terminal (a live bar) rather than a file (plain lines): stderr is a
    TTY, unless ``interactive`` says otherwise."""
    return sys.stderr.isatty() if interactive is None else interactive


def _lines(items: Iterable[T], desc: str, total: Optional[int], unit: str, every_s: float) -> Iterator[T]:
    started = last = time.monotonic()
    n = 0
    for item in items:
        yield item
        n += 1
        now = time.monotonic()
        if now - last >= every_s or n == total:
            print(f"{desc}: {progress_line(n, total, now - started, unit)}", file=sys.stderr, flush=True)
            last = now


def progress_line(done: int, total: Optional[int], seconds: float, unit: str) -> str:
    """``120/500 batch (24.0%), 3.2 batch/s, 00:01:58 left`` (without a total: count and rate)."""
    rate = done / seconds if seconds > 0 else float("nan")
    if not total:
        return f"{done} {unit}, {rate:.1f} {unit}/s"
    return f"{done}/{total} {unit} ({100 * done / total:.1f}%), {rate:.1f} {unit}/s, {time_left(done, total, seconds)} left"


def time_left(done: int, total: int, seconds: float) -> str:
    """``1d 02:14:07``, ``00:03:10``, or ``?`` before anything is done."""
    if done <= 0:
        return "?"
    left = seconds / done * max(total - done, 0)
    days = f"{int(left // 86400)}d " if left >= 86400 else ""
    return days + time.strftime("%H:%M:%S", time.gmtime(left % 86400))
