"""The embedded demo (``make demo``): mini-Taskonomy -> shards -> DeepSpeed training on 2 CPU processes.

1. generate the mini-Taskonomy in the release layout under ``data_cache/`` if it is absent;
2. write its train split as WebDataset shards if absent;
3. train the tiny preset on all 13 tasks with DeepSpeed (ZeRO-1, fp32) on 2 processes launched by
   torchrun, expert parallelism 2 (each rank holds half of every MoE MLP layer's experts);
4. print where the run's logs, checkpoint and expert-usage table are.

Every step is a plain command you can run yourself; the demo prints each before running it.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str]) -> None:
    print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modsquad_ds.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data_cache/mini_taskonomy", help="where the data set goes")
    parser.add_argument("--nproc", type=int, default=2, help="training processes (default 2)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra training overrides, e.g. train.steps=50")
    args = parser.parse_args(argv)

    data = Path(args.data)
    raw, shards = data / "raw", data / "shards"
    py = sys.executable
    if not (raw / "splits").is_dir():
        run([py, "-m", "data_tools.mini_taskonomy", "--out", str(raw), "--buildings", "8", "--points", "5",
             "--views", "4", "--workers", "2"])
    if not (shards / "train.index.json").is_file():
        run([py, "-m", "data_tools.make_shards", "--root", str(raw), "--split", "train",
             "--split-csv", str(raw / "splits" / "train_val_test_mini.csv"), "--out", str(shards)])
    train = [py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
             "-m", "modsquad_ds.train", "--config", "configs/demo.yaml", "--set", f"data.shards_dir={shards}",
             "--set", f"train.ep_size={args.nproc}"]
    for override in args.overrides:
        train += ["--set", override]
    run(train)
    return 0


if __name__ == "__main__":
    sys.exit(main())
