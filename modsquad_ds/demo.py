"""The embedded demo (``make demo``): mini-Taskonomy -> shards -> DeepSpeed training on 2 CPU
processes -> evaluation -> pruned per-task models.

1. generate the mini-Taskonomy in the release layout under ``data_cache/`` if it is absent;
2. write its train, val and test splits as WebDataset shards if absent;
3. train the tiny preset on all 13 tasks with DeepSpeed (ZeRO-1, fp32) on 2 processes launched by
   torchrun, expert parallelism 2 (each rank holds half of every MoE MLP layer's experts);
4. evaluate the run on the test split with the paper's metrics, on the same 2 processes;
5. export one pruned standalone model per task (experts a task uses for under 1% of its routing
   choices dropped), with a parameter/FLOP report.

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
    for split in ("train", "val", "test"):  # val: for train.eval_every and the docs' --split val examples
        if not (shards / f"{split}.index.json").is_file():
            run([py, "-m", "data_tools.make_shards", "--root", str(raw), "--split", split,
                 "--split-csv", str(raw / "splits" / "train_val_test_mini.csv"), "--out", str(shards)])
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    train = torchrun + ["-m", "modsquad_ds.train", "--config", "configs/demo.yaml",
                        "--set", f"data.shards_dir={shards}", "--set", f"train.ep_size={args.nproc}"]
    for override in args.overrides:
        train += ["--set", override]
    run(train)
    out_dir = _out_dir(args.overrides)
    # torchrun would read --run as its own --run-path: the run folder goes positionally
    run(torchrun + ["-m", "modsquad_ds.evaluate", out_dir, "--split", "test", "--set", f"data.shards_dir={shards}",
                    "--set", f"train.ep_size={args.nproc}"])
    run([py, "-m", "modsquad_ds.export", "--run", out_dir, "--threshold", "1.0", "--no-progress"])
    print(f"\nrun folder: {out_dir}/ (metrics.jsonl, tensorboard/, usage.png, checkpoints/); test metrics: "
          f"{out_dir}/eval/; per-task models: {out_dir}/export/")
    return 0


def _out_dir(overrides: list[str]) -> str:
    """The run folder, as the trainer resolves it from configs/demo.yaml and the overrides."""
    from modsquad_ds.config import load_config

    return load_config([ROOT / "configs" / "demo.yaml"], overrides).train.out_dir


if __name__ == "__main__":
    sys.exit(main())
