"""Train Mod-Squad with DeepSpeed.

The same command works as a plain single process and under every launcher:

    python -m modsquad_ds.train --config run.yaml --set train.steps=1000
    torchrun --nproc_per_node 8 -m modsquad_ds.train --config run.yaml --set train.ep_size=8
    deepspeed --num_gpus 8 --module modsquad_ds.train --config run.yaml
    mpiexec -n 16 python -m modsquad_ds.train --config run.yaml
    srun python -m modsquad_ds.train --config run.yaml        (inside sbatch; see slurm/)

Learn new tasks on a trained run by tuning only routers, task embedding and heads (docs/finetune.md):

    python -m modsquad_ds.train --config runs/source/config.yaml --set finetune.mode=routers \\
        --set finetune.init_from=runs/source --set tasks.names=[class_object,class_scene] \\
        --set data.fraction=0.1 --set train.out_dir=runs/new_tasks

(the source's config.yaml carries its train.ep_size: --set the one this launch needs)

Settings come from the preset, then the YAML files in order, then --set overrides; the resolved
config and DeepSpeed JSON are written into train.out_dir with the checkpoints, TensorBoard logs,
metrics.jsonl and usage.json (expert usage per task and layer). A run folder holding a checkpoint is
resumed from it unless --no-resume is given. Bad settings are refused before any process starts
talking to another.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import NoReturn

from modsquad_ds.config import ConfigError, load_config
from modsquad_ds.distributed.accelerator import pin_deepspeed_accelerator


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m modsquad_ds.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML run file; repeat to layer several (later ones win)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set train.ep_size=2 --set moe.mlp.top_k=2")
    parser.add_argument("--preset", choices=["tiny", "small", "base"],
                        help="model preset (default: the config's 'preset', else tiny)")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume", dest="resume", action="store_true", default=None,
                        help="continue from the newest checkpoint in train.out_dir (the default)")
    resume.add_argument("--no-resume", dest="resume", action="store_false",
                        help="start from scratch; an earlier run's files in train.out_dir move to "
                             "replaced-<UTC time>/ there")
    # The deepspeed launcher appends --local_rank=N unless given --no_local_rank; LOCAL_RANK in the
    # environment says the same, so accept and ignore it.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def validate_before_launch(cfg):
    """Everything that can be checked without talking to other ranks; raises ConfigError."""
    from modsquad_ds.distributed.bootstrap import plan_launch
    from modsquad_ds.distributed.ds_config import ds_config_for_run
    from modsquad_ds.train.preflight import check_run

    ds_config = ds_config_for_run(cfg)
    if cfg.finetune.enabled:
        from modsquad_ds.finetune import check_source, finetune_ds_config

        check_source(cfg)
        ds_config = finetune_ds_config(cfg, ds_config)
    launch, dims = plan_launch(cfg, ds_config)
    check_run(cfg, launch.world_size)
    return ds_config, launch, dims


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    pin_deepspeed_accelerator()
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"train.resume={str(args.resume).lower()}")
    try:
        cfg = load_config(args.config, overrides, preset=args.preset)
        ds_config, launch, dims = validate_before_launch(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from modsquad_ds.data.corrupt import CorruptDataError
    from modsquad_ds.distributed.bootstrap import init_distributed, seed_everything, shutdown
    from modsquad_ds.distributed.collectives import any_rank
    from modsquad_ds.distributed.cpu_threads import set_cpu_threads
    from modsquad_ds.distributed.watchdog import EXIT_DATA, EXIT_NONFINITE, EXIT_STOPPED, die, fail_fast
    from modsquad_ds.train.checkpoint import CheckpointDamaged, ResumeMismatch
    from modsquad_ds.train.run_lock import RunFolderBusy, RunLock
    from modsquad_ds.train.skips import describe
    from modsquad_ds.train.trainer import NonFiniteLoss, Trainer

    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)  # DeepSpeed's INFO lines drown the progress bar
    import warnings

    # DeepSpeed 0.19.8's ZeRO calls a torch collective that torch 2.14 marks deprecated, every step.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    from modsquad_ds.distributed.env import LaunchError

    try:
        ctx = init_distributed(launch, timeout_s=cfg.train.dist_timeout_s,
                               heartbeat_timeout_s=cfg.train.heartbeat_timeout_s)
    except LaunchError as err:  # e.g. more ranks on a node than GPUs it can see
        print(f"error: rank {launch.rank}: {err}", file=sys.stderr)
        return 2
    seed_everything(cfg.seed)
    with fail_fast(ctx.rank, ctx.world_size):
        threads = set_cpu_threads(cfg.data.workers)
        # The run folder belongs to one run: rank 0 locks it for the run's life (released by the
        # kernel however the process ends) and every rank learns the verdict.
        busy, lock = None, None
        if ctx.rank == 0:
            try:
                lock = RunLock(cfg.train.out_dir).acquire()
            except RunFolderBusy as err:
                busy = err
        if any_rank(busy is not None):
            if busy is not None:
                print(f"error: {busy}", file=sys.stderr, flush=True)
            shutdown(ctx)
            return 2
        if ctx.rank == 0:
            cpu = "" if threads is None else f" | {threads} cpu threads per rank"
            print(f"modsquad_ds.train: {dims.describe()} | {launch.describe()} | "
                  f"init {ctx.init_seconds:.1f}s{cpu}", flush=True)
        try:
            result = Trainer(cfg, ds_config, ctx.rank, ctx.world_size).run()
            if result.stopped_by_signal:
                # Saved and on the way out: a launcher that sees the first rank exit EXIT_STOPPED
                # sends the others SIGTERM (torchrun; srun --kill-on-bad-exit), which must not turn
                # their clean exit into "killed" (srun would report 143, not 3). Set on every rank
                # before shutdown's barrier, so before any rank can exit.
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # nor a Ctrl-C a launcher forwards again
        except NonFiniteLoss as err:
            die(f"rank {ctx.rank}: {err}", EXIT_NONFINITE)
        except CorruptDataError as err:
            # raised in a loader worker, the DataLoader re-raises it with the worker's traceback in
            # the message: its last line is "modsquad_ds.data.corrupt.CorruptDataError: <message>"
            last = str(err).strip().splitlines()[-1]
            die(f"rank {ctx.rank}: {last.split('CorruptDataError: ', 1)[-1]}", EXIT_DATA)
        except (ResumeMismatch, CheckpointDamaged) as err:
            if ctx.rank == 0:
                print(f"error: {err}", file=sys.stderr, flush=True)
            shutdown(ctx)
            return 2
        if ctx.rank == 0:
            loss = result.last_scalars.get("loss/total", float("nan"))
            if result.steps_run == 0:
                summary = (f"nothing to do: the run in {result.out_dir} is complete at step "
                           f"{result.position.step} (raise train.steps to go on)")
            else:
                status = "stopped early (run the same command to resume)" if result.stopped_early else "done"
                if result.stopped_by_signal:
                    status = f"stopped by SIGTERM or Ctrl-C, exit code {EXIT_STOPPED} (run the same command to resume)"
                summary = (f"{status}: step {result.position.step}, loss {loss:.4f}, "
                           f"{result.images_per_second:.1f} images/s, first step after "
                           f"{result.seconds_to_first_step:.1f}s")
            if result.skipped:
                summary += f"\nwarning: {describe(result.skipped)}"
            print(f"{summary}\n"
                  f"run folder: {result.out_dir}\n"
                  f"checkpoint: {result.checkpoint}\n"
                  f"logs: tensorboard --logdir {result.out_dir / 'tensorboard'}", flush=True)
        shutdown(ctx)
    if lock is not None:
        lock.release()
    return EXIT_STOPPED if result.stopped_by_signal else 0


def cli() -> NoReturn:
    """``python -m modsquad_ds.train`` and the ``modsquad-train`` command."""
    from modsquad_ds.distributed.bootstrap import run_command

    run_command(main)  # not sys.exit: see end_process (gloo threads vs interpreter teardown)


if __name__ == "__main__":
    cli()
