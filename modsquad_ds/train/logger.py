"""Rank-0 run logging: a progress bar, TensorBoard scalars and a JSON-lines metrics file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from tqdm import tqdm


def _open_metrics(path: Path, start_step: int):
    """Append to the metrics of the run being continued, dropping rows logged after its checkpoint
    (a crashed run may have logged steps that the resumed run will log again)."""
    kept = []
    if path.is_file():
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= start_step]
    with open(path, "w") as f:
        f.writelines(line + "\n" for line in kept)
    return open(path, "a")


class RunLogger:
    def __init__(self, out_dir: Path, total_steps: int, start_step: int, enabled: bool, progress: bool = True):
        self.enabled = enabled
        self.bar: Optional[tqdm] = None
        self.tb = None
        self.jsonl = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)
        self.jsonl = _open_metrics(out_dir / "metrics.jsonl", start_step)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        disable=not progress)

    def step(self, step: int, scalars: Optional[dict[str, float]] = None) -> None:
        if not self.enabled:
            return
        self.bar.update(1)
        if scalars:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, step)
            self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
            self.jsonl.flush()
            self.bar.set_postfix(loss=f"{scalars.get('loss/total', float('nan')):.4f}")

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.tb.close()
            self.jsonl.close()
