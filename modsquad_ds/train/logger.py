"""Rank-0 run logging: progress on the terminal or in a log file, TensorBoard scalars and a
JSON-lines metrics file."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from modsquad_ds.progress import LINE_EVERY_S, on_terminal, time_left


EVAL_RECORD = "eval_during_training.jsonl"
"""train.eval_every's results, a row per validated step (the trainer writes it; rank 0)."""


def read_record(path: Path) -> list[tuple[str, dict]]:
    """The lines of a JSON-lines record (metrics.jsonl, EVAL_RECORD) with their rows; blank lines and
    a last line cut short by a crash are left out."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else ():
        try:
            rows.append((line, json.loads(line)))
        except ValueError:
            continue
    return rows


def keep_record_until(path: Path, step: int) -> None:
    """Drop the rows of a run being continued that were logged after ``step``, its checkpoint (a
    crashed run may have logged steps that the resumed run will log again)."""
    if path.is_file():
        path.write_text("".join(line + "\n" for line, row in read_record(path) if row.get("step", 0) <= step))


class RunLogger:
    """``progress``: show it at all. On a terminal it is a live bar; into a file (not a TTY) a live
    bar is a carriage return per update, one ever-growing line (10 updates a second for days on a
    cluster), so there it is a plain line at logged steps, at most every ``LINE_EVERY_S`` seconds and
    at the last step: step, loss, images/s, learning rate and time left."""

    def __init__(self, out_dir: Path, total_steps: int, start_step: int, enabled: bool, progress: bool = True,
                 interactive: Optional[bool] = None, line_every_s: float = LINE_EVERY_S):
        self.enabled = enabled
        self.bar: Optional[tqdm] = None
        self.tb = None
        self.jsonl = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)
        for record in ("metrics.jsonl", EVAL_RECORD):
            keep_record_until(out_dir / record, start_step)
        self.jsonl = open(out_dir / "metrics.jsonl", "a")
        interactive = on_terminal(interactive)
        if progress and interactive:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        self.lines = progress and not interactive
        self.total, self.start_step, self.line_every_s = total_steps, start_step, line_every_s
        self.started = self.last_line = time.monotonic()
        self.lines_written = 0

    def step(self, step: int, scalars: Optional[dict[str, float]] = None) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
        if scalars:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, step)
            self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
            self.jsonl.flush()
            loss = scalars.get("loss/total", float("nan"))
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}")
            now = time.monotonic()
            due = not self.lines_written or now - self.last_line >= self.line_every_s or step >= self.total
            if self.lines and due:
                self._line(step, loss, scalars, now)

    def _line(self, step: int, loss: float, scalars: dict[str, float], now: float) -> None:
        left = time_left(step - self.start_step, self.total - self.start_step, now - self.started)
        print(f"train: step {step}/{self.total} ({100 * step / max(self.total, 1):.1f}%), loss {loss:.4f}, "
              f"{scalars.get('perf/images_per_s', float('nan')):.1f} images/s, lr {scalars.get('lr', float('nan')):.3g}, "
              f"{left} left", file=sys.stderr, flush=True)
        self.last_line, self.lines_written = now, self.lines_written + 1

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)

    def close(self) -> None:
        if self.enabled:
            if self.bar is not None:
                self.bar.close()
            self.tb.close()
            self.jsonl.close()
