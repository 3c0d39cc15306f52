"""Reshard a run's checkpoint so training resumes on another number of ranks or another ep_size.

    python -m modsquad_ds.reshard --run runs/demo --world-size 4 --ep-size 2 --out runs/demo_4gpu
    torchrun --nproc_per_node 4 -m modsquad_ds.train --config runs/demo_4gpu/config.yaml

Reads the newest checkpoint (or --checkpoint STEP) of any layout on the CPU, and writes --out as a run
folder: config.yaml with the new train.ep_size, train.out_dir and data.batch_size (scaled so the global
batch stays the same unless you --set data.batch_size), and a layout-free checkpoint (fp32 master
weights and Adam moments of every parameter) that the trainer's resume splits over the new ranks.
Weights, optimizer state, schedule, step and expert-usage sums carry over exactly; the data order
follows the new layout. Needs fp32 master weights (a bf16 run saved at ZeRO 1/2, or any fp32 run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from modsquad_ds.config.schema import ConfigError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m modsquad_ds.reshard", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path, help="run folder to reshard (train.out_dir)")
    p.add_argument("--out", required=True, type=Path, help="new run folder to write (then train with it)")
    p.add_argument("--world-size", required=True, type=int, help="number of ranks the run continues on")
    p.add_argument("--ep-size", type=int, help="expert-parallel size on the new layout (default: unchanged)")
    p.add_argument("--checkpoint", type=int, metavar="STEP", help="step to reshard (default: the latest)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="further config overrides for the new run, e.g. --set data.batch_size=4")
    args = p.parse_args(argv)
    if args.world_size < 1:
        p.error("--world-size must be >= 1")
    from modsquad_ds.export.reshard import reshard

    try:
        folder = reshard(args.run, args.out, args.world_size, args.ep_size, args.checkpoint, tuple(args.overrides))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"resharded checkpoint: {folder}\nresume with: train.out_dir={args.out} on {args.world_size} ranks "
          f"(e.g. torchrun --nproc_per_node {args.world_size} -m modsquad_ds.train --config {args.out / 'config.yaml'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
