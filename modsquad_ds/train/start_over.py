"""``train.resume: false`` (``--no-resume``) into a run folder an earlier run wrote: set that run aside.

Starting over beside the earlier run's files would mix the two: its checkpoints at higher steps
outlive the new run's (pruning keeps the highest steps), ``latest`` would name a folder that was
just pruned, and the next plain resume would continue the *earlier* run. Deleting them would lose
work a user may still want. So the earlier run's outputs move, whole, into
``{out_dir}/replaced-{UTC time}/`` and the new run starts in a clean folder.

Only the files a run writes move (a run folder may be a directory that holds other things too).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tensorboard", "usage.json", "usage.png",
               "eval_during_training.jsonl", "eval", "export", "config.yaml", "ds_config.json")
"""What training, evaluation and export write into a run folder (the run lock stays: it is held)."""


def set_aside_earlier_run(out_dir: Path) -> Optional[Path]:
    """Move an earlier run's outputs into ``out_dir/replaced-*``; that folder, or None when no earlier
    run trained there (no checkpoints, no metrics). Call on one process only."""
    out_dir = Path(out_dir)
    checkpoints = out_dir / "checkpoints"
    trained = (checkpoints.is_dir() and any(checkpoints.iterdir())) or (out_dir / "metrics.jsonl").is_file()
    if not trained:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    aside, n = out_dir / f"replaced-{stamp}", 1
    while aside.exists():  # two start-overs within a second
        aside, n = out_dir / f"replaced-{stamp}-{n}", n + 1
    aside.mkdir()
    for name in RUN_OUTPUTS:
        if (out_dir / name).exists():
            os.replace(out_dir / name, aside / name)  # same file system: a rename, nothing copied
    return aside
