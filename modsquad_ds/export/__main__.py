"""Export a trained run: one small standalone model per task (paper Sec. 3.4), or the whole model.

    python -m modsquad_ds.export --run runs/demo --threshold 1.0
    python -m modsquad_ds.export --run runs/demo --tasks depth_zbuffer normal --keep-top 50
    python -m modsquad_ds.export --run runs/demo --threshold 1.0 --usage calibration --shards data/shards
    python -m modsquad_ds.export --run runs/demo --whole

Reads the run's checkpoint (any world size, ep_size, ZeRO stage 0/1/2, fp32 or bf16; bf16 runs give
their fp32 master weights) on the CPU without DeepSpeed processes, then for each task drops every MoE
MLP and attention expert the task uses less than --threshold percent of its routing choices (paper:
1.0), or keeps the --keep-top percent most used per layer, lowers top-k where fewer experts remain,
and drops the other tasks' routers, embeddings and heads. Usage comes from the statistics saved in
training (default) or from a calibration pass over WebDataset shards (--usage calibration).

Writes into --out (default RUN/export/step_N): {task}.safetensors + {task}.json per task, loadable
without DeepSpeed (TaskViT.from_file, or timm.create_model("modsquad_task_vit", pretrained=True,
pretrained_cfg_overlay=dict(file=...))); report.json and report.md (parameters and FLOPs per task
against the full model and the dense ViT); kept_experts.png. --whole writes whole.safetensors.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from modsquad_ds.config.schema import ConfigError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m modsquad_ds.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path, help="run folder (train.out_dir: config.yaml, checkpoints/)")
    p.add_argument("--checkpoint", type=int, metavar="STEP", help="step to export (default: the latest)")
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="tasks to export (default: all of the run's)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--threshold", type=float, metavar="PCT",
                     help="drop experts a task uses for less than PCT%% of its routing choices (paper: 1.0)")
    how.add_argument("--keep-top", type=float, metavar="PCT", help="keep the PCT%% most used experts of each layer")
    how.add_argument("--whole", action="store_true", help="export the whole model (all tasks) as one file")
    p.add_argument("--usage", choices=["training", "calibration"], default="training",
                   help="expert usage from the training statistics (default) or a calibration pass")
    p.add_argument("--shards", type=Path, help="WebDataset shard folder for --usage calibration")
    p.add_argument("--split", default="val", help="split of --shards to calibrate on (default: val)")
    p.add_argument("--calibration-batches", type=int, metavar="N", help="at most N batches (default: the whole split)")
    p.add_argument("--batch-size", type=int, help="calibration batch size (default: the run's data.batch_size)")
    p.add_argument("--require-master", action="store_true",
                   help="refuse a bf16 checkpoint without fp32 master weights instead of upcasting bf16")
    p.add_argument("--out", type=Path, help="output folder (default: RUN/export/step_N)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if not args.whole and args.threshold is None and args.keep_top is None:
        p.error("give --threshold PCT, --keep-top PCT or --whole")
    if args.usage == "calibration" and args.shards is None:
        p.error("--usage calibration needs --shards DIR")
    for name in ("calibration_batches", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("threshold", "keep_top"):
        value = getattr(args, name)
        if value is not None and not 0 <= value <= 100:
            p.error(f"--{name.replace('_', '-')} must be a percentage in [0, 100], got {value}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # the reader imports DeepSpeed's MoE module (checkpoint key names); everything here runs on the CPU
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from modsquad_ds.export.pipeline import export_run

    try:
        summary = export_run(args.run, step=args.checkpoint, tasks=args.tasks, threshold=args.threshold,
                             keep_top=args.keep_top, whole=args.whole, usage=args.usage, shards=args.shards,
                             split=args.split, calibration_batches=args.calibration_batches,
                             batch_size=args.batch_size, require_master=args.require_master, out=args.out,
                             progress=not args.no_progress)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(summary["out"])
    if "whole" in summary:
        print(f"whole model: {summary['whole']} ({summary['weights']})")
    else:  # the same figures as report.json, as the table a person reads
        print((out / "report.md").read_text().rstrip())
        print(f"per-task models, report.json/.md and kept_experts.png in {out} ({summary['weights']})")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
