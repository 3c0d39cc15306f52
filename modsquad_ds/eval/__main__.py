"""Evaluate a trained run: the paper's metrics per task, expert usage and task similarity.

    python -m modsquad_ds.evaluate --run runs/demo --split test
    python -m modsquad_ds.evaluate --run runs/demo --checkpoint 200 --split val --set data.batch_size=16
    torchrun --nproc_per_node 2 -m modsquad_ds.evaluate runs/demo --split test --set train.ep_size=2

The run's resolved config (``{run}/config.yaml``) is loaded, then ``--config`` files and ``--set``
overrides (e.g. another ``data.shards_dir``). The checkpoint's weights go into a DeepSpeed engine at
this launch's layout (module only, so any world size and ep_size that divide the experts work; when
the run's ``train.ep_size`` does not divide this world size, the largest one that does is used).
Every sample of the split is evaluated exactly once over all ranks; metrics are exact sums reduced
across ranks, so any number of processes gives the numbers of one.

Writes ``{run}/eval/{split}_step_{N}.json`` (metrics, usage, similarity), a markdown table like the
paper's Table 1, PNG usage and similarity maps and TensorBoard scalars (``eval_{split}/...``).
Splits are those written by ``python -m data_tools.make_shards --split val|test`` (or, for
``data.source: raw``, the split CSV's columns).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
from pathlib import Path
from typing import Optional

from modsquad_ds.config import ConfigError, load_config
from modsquad_ds.config.finetune import FinetuneConfig
from modsquad_ds.distributed.accelerator import pin_deepspeed_accelerator


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m modsquad_ds.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_folder", nargs="?", metavar="DIR", help="run folder, as an alternative to --run")
    parser.add_argument("--run", metavar="DIR", help="run folder (holds config.yaml, checkpoints/); under torchrun "
                        "give the folder positionally: torchrun reads --run as its own --run-path")
    parser.add_argument("--checkpoint", type=int, metavar="STEP", help="checkpoint step (default: the newest)")
    parser.add_argument("--split", default="val", help="split to evaluate: val or test (default val)")
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML layered over the run's config.yaml (repeatable)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set data.shards_dir=/data/shards")
    parser.add_argument("--max-samples", type=int, metavar="N",
                        help="evaluate only the split's first N samples (a quick look: written as "
                             "{split}_first{N}_step_*, apart from the whole split's results)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.run and not args.run_folder:
        parser.error("give the run folder: --run DIR or DIR")
    if args.run and args.run_folder:
        parser.error("give the run folder once: --run DIR or DIR, not both")
    if args.max_samples is not None and args.max_samples < 1:
        parser.error(f"--max-samples must be >= 1, got {args.max_samples}")
    args.run = args.run or args.run_folder
    return args


def resolve(run_dir: Path, files, overrides, world_size: int):
    """The evaluation config of a run, checked before any process group starts. Returns
    (cfg, ds_config, note); raises ConfigError."""
    from modsquad_ds.distributed.ds_config import ds_config_for_run

    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ConfigError("--run", f"{config_file} not found: not a run folder")
    cfg = load_config([config_file, *files], [*overrides, f"train.out_dir={run_dir}"])
    note = ""
    ep = cfg.train.ep_size
    if world_size % ep or ep > world_size:
        new = math.gcd(world_size, ep)
        note = f"train.ep_size {ep} does not divide this world size ({world_size}): evaluating at ep_size {new}"
        cfg = load_config([config_file, *files], [*overrides, f"train.out_dir={run_dir}", f"train.ep_size={new}"])
    if cfg.finetune.enabled:
        # A fine-tuned run's checkpoint holds every weight: evaluate the plain model of its tasks, not
        # the fine-tuning build, which reads the source run (perhaps deleted by now) and freezes the
        # experts (ZeRO 1/2 engines then refuse the model: finetune/source.py).
        cfg = dataclasses.replace(cfg, finetune=FinetuneConfig())
    return cfg, ds_config_for_run(cfg), note


def evaluate_checkpoint(cfg, ds_config: dict, folder: Path, split: str, rank: int, world_size: int,
                        max_samples: Optional[int] = None, progress: bool = True):
    """Build the run's engine, load ``folder``'s weights and evaluate (a collective)."""
    from modsquad_ds.eval.checkpoints import load_weights
    from modsquad_ds.eval.runner import evaluate_model
    from modsquad_ds.train.trainer import build_engine

    engine = build_engine(cfg, ds_config)
    load_weights(engine, folder)
    return evaluate_model(engine.module.model, cfg, split, rank, world_size, max_samples, progress and rank == 0)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    pin_deepspeed_accelerator()
    from modsquad_ds.distributed import env as launch_env
    from modsquad_ds.distributed.bootstrap import plan_launch
    from modsquad_ds.eval.checkpoints import check_architecture, check_files, expected_expert_files
    from modsquad_ds.train.checkpoint import CheckpointError, find_checkpoint, step_of
    from modsquad_ds.train.preflight import check_split

    run_dir = Path(args.run)
    try:
        if not run_dir.is_dir():
            raise ConfigError("--run", f"folder not found: {run_dir}")
        world = launch_env.resolve().world_size
        cfg, ds_config, note = resolve(run_dir, args.config, args.overrides, world)
        check_split(cfg, args.split, "--split")
        launch, _dims = plan_launch(cfg, ds_config)
        folder = find_checkpoint(run_dir, args.checkpoint)
        check_architecture(folder, cfg)
        check_files(folder, expected_expert_files(cfg))
    except (ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from deepspeed.utils import logger as ds_logger

    from modsquad_ds.distributed.bootstrap import init_distributed, seed_everything, shutdown
    from modsquad_ds.eval.report import table1, write_results

    ds_logger.setLevel(logging.WARNING)
    ctx = init_distributed(launch, timeout_s=cfg.train.dist_timeout_s, heartbeat_timeout_s=0)
    seed_everything(cfg.seed)
    if ctx.rank == 0 and note:
        print(f"note: {note}", flush=True)
    try:
        result = evaluate_checkpoint(cfg, ds_config, folder, args.split, ctx.rank, ctx.world_size, args.max_samples)
    except CheckpointError as err:
        if ctx.rank == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        shutdown(ctx)
        return 2
    if ctx.rank == 0:
        path = write_results(run_dir, result, step_of(folder), str(folder), cfg.tasks.names)
        print(table1({run_dir.name: result.metrics}, cfg.tasks.names))
        extra = f", {result.corrupt} corrupt skipped" if result.corrupt else ""
        print(f"{args.split}: {result.samples} images on {ctx.world_size} rank(s){extra}\nresults: {path}\n"
              f"table: {path.with_suffix('.md')}", flush=True)
    shutdown(ctx)
    return 0


if __name__ == "__main__":
    from modsquad_ds.distributed.bootstrap import run_command

    run_command(main)  # not sys.exit: see end_process (gloo threads vs interpreter teardown)
