"""Reproduce the paper's claims in miniature: train the baselines and Mod-Squad on the mini-Taskonomy,
evaluate them, and write a markdown report with tables and PNG figures.

    python -m modsquad_ds.study                                  # default budget: ~3 min on 2 idle cores
    python -m modsquad_ds.study --steps 600 --seeds 0 1 2        # a bigger budget
    python -m modsquad_ds.study --methods stl mtl modsquad --steps 20 --seeds 0 --out runs/quick

Steps: (1) the demo's data path: the mini-Taskonomy under data_cache/ and its train, val and test
shards (made if absent); (2) per seed, every method's run (``configs/demo.yaml`` layered with
``configs/baselines/{method}.yaml``; STL is one dense run per task) trained with the trainer in this
process, on the tiny preset, CPU (or the GPU when there is one); (3) each run evaluated on
``--split`` with ``modsquad_ds.evaluate``'s code; (4) the report ``{report}/README.md`` with
Table 1 / Table 2 style tables, MI and sharpness, task similarity and clusters, and figures.
Runs already finished (their evaluation file exists) are reused, so an interrupted study resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from modsquad_ds.distributed.accelerator import pin_deepspeed_accelerator
from modsquad_ds.study.runs import METHODS, ROOT, RunSpec, run_config, train_and_evaluate

DEFAULT_METHODS = ["stl", "mtl", "normal_moe", "modified_moe", "modsquad"]


def prepare_data(data: Path) -> Path:
    raw, shards = data / "raw", data / "shards"
    py = sys.executable
    if not (raw / "splits").is_dir():
        subprocess.run([py, "-m", "data_tools.mini_taskonomy", "--out", str(raw), "--buildings", "8", "--points", "5",
                        "--views", "4", "--workers", "2"], cwd=ROOT, check=True)
    for split in ("train", "val", "test"):
        if not (shards / f"{split}.index.json").is_file():
            subprocess.run([py, "-m", "data_tools.make_shards", "--root", str(raw), "--split", split, "--split-csv",
                            str(raw / "splits" / "train_val_test_mini.csv"), "--out", str(shards), "--no-progress",
                            "--workers", "2"], cwd=ROOT, check=True)
    return shards


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m modsquad_ds.study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100, help="training steps of every run (default 100)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds (default 0 1; >= 2 gives a spread)")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS),
                   help=f"methods to run (default: {' '.join(DEFAULT_METHODS)})")
    p.add_argument("--split", default="test", help="split to evaluate (default test)")
    p.add_argument("--data", default="data_cache/mini_taskonomy", help="mini-Taskonomy folder (the demo's)")
    p.add_argument("--out", default="runs/study", help="folder for the runs")
    p.add_argument("--report", help="folder for the report and figures (default: {out}/report)")
    p.add_argument("--config", default="configs/demo.yaml", help="base run file every method layers over")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every run, e.g. data.batch_size=16")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--verbose", action="store_true", help="show each run's progress bars")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    pin_deepspeed_accelerator()
    # One intra-op thread: the tiny models gain nothing from two, and on a busy machine two
    # spinning OpenMP threads made a 40-step run 3.4x slower (118 s vs 35 s, docs/evaluation.md).
    torch.set_num_threads(args.threads)
    from modsquad_ds.config import ConfigError

    out = Path(args.out)
    report_dir = Path(args.report) if args.report else out / "report"
    shards = prepare_data(Path(args.data))
    # data.workers=0: an epoch of the mini-Taskonomy is 15 batches, and a worker process per epoch
    # (the loader's workers are not persistent) would cost more than the decoding it saves.
    common = [f"data.shards_dir={shards}", f"train.steps={args.steps}", "train.ep_size=1", "data.workers=0",
              "train.checkpoint_every=0", f"train.warmup_steps={min(10, args.steps // 10)}",
              f"train.log_every={max(1, min(10, args.steps))}", "train.keep_checkpoints=1", *args.overrides]
    probe = RunSpec("mtl", args.seeds[0], out / "probe", common)
    try:
        cfg0 = run_config(probe, args.config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tasks = list(cfg0.tasks.names)

    from deepspeed.utils import logger as ds_logger

    from modsquad_ds.distributed.bootstrap import init_distributed, shutdown
    from modsquad_ds.study.report import build

    ds_logger.setLevel(logging.ERROR)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key, None)
    ctx = init_distributed(timeout_s=cfg0.train.dist_timeout_s, heartbeat_timeout_s=0)
    jobs = [(seed, m, t) for seed in args.seeds for m in args.methods for t in (tasks if m == "stl" else [None])]
    results: dict = {}
    started = time.perf_counter()
    run_seconds = 0.0
    for i, (seed, method, task) in enumerate(jobs, 1):
        name = f"{method}_{task}" if task else method
        spec = RunSpec(method, seed, out / f"seed{seed}" / name,
                       common + ([f"tasks.names=[{task}]"] if task else []))
        t0 = time.perf_counter()
        data = train_and_evaluate(spec, args.config, args.split, progress=args.verbose)
        timing = spec.out_dir / "study_seconds.json"
        run_seconds += json.loads(timing.read_text()) if timing.is_file() else 0.0
        merged = results.setdefault(method, {}).setdefault(seed, {"tasks": {}, "usage": {}})
        merged["tasks"].update(data["tasks"])
        if not task:
            merged["usage"] = data["usage"]
        print(f"[{i}/{len(jobs)}] seed {seed} {name}: {time.perf_counter() - t0:.0f}s "
              f"(total {time.perf_counter() - started:.0f}s)", flush=True)
    (out / "results.json").write_text(json.dumps(results))
    labels = {m: METHODS[m][1] for m in args.methods}
    settings = {"methods": " ".join(args.methods), "steps": str(args.steps), "split": args.split,
                "base config": args.config,
                "overrides": " ".join(args.overrides) or "none",
                "device": "cuda" if torch.cuda.is_available() else "cpu",
                "training and evaluation time": f"{run_seconds / 60:.1f} min"}
    path = build(results, labels, tasks, report_dir, settings)
    print(f"report: {path}")
    shutdown(ctx)
    return 0


if __name__ == "__main__":
    from modsquad_ds.distributed.bootstrap import run_command

    run_command(main)  # not sys.exit: see end_process (gloo threads vs interpreter teardown)
