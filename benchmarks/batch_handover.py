"""What the training process pays to take a batch from a loader worker: packed against per tensor.

The training loader's workers prepare batches ahead; once a batch is ready, taking it still costs
the training process time: receiving it from the worker and rebuilding its tensors (and, on CUDA,
pinning them). Measured here as the time ``next()`` takes when the workers are ahead (the consumer
sleeps ``--step-ms`` between batches, as a training step would), side by side in one run:

- ``packed``: the shipped loader, each batch one block of shared memory (modsquad_ds/data/packed.py);
- ``per tensor``: the same loader, each of the batch's 21 tensors its own segment (torch's default,
  the loader before packing).

The variants alternate epoch by epoch, so outside load hits them alike. Time per batch is the median
over all epochs; the ratio is ``per tensor / packed`` (higher: packing saves more).

    python benchmarks/batch_handover.py                          # configs/demo.yaml's shards (make demo)
    python benchmarks/batch_handover.py --set data.shards_dir=DIR --set data.batch_size=32 --set model.img_size=224
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli import add_run_config_args, load_run_config, one_line_errors, positive  # noqa: E402

from modsquad_ds.data import loader as loader_module  # noqa: E402


def handover_ms(cfg, epoch: int, step_ms: float, packed: bool) -> list[float]:
    """Milliseconds of each ``next()`` of one epoch, after its first batch (worker start-up)."""
    pack = loader_module.pack
    if not packed:  # the peer: batches leave the workers as they are
        loader_module.pack = lambda batch: batch
    try:
        batches = iter(loader_module.build_train_loader(cfg, 0, 1, epoch))
        next(batches)
        times = []
        while True:
            time.sleep(step_ms / 1e3)  # the training step, during which the workers get ahead
            t0 = time.perf_counter()
            try:
                next(batches)
            except StopIteration:
                return times
            times.append((time.perf_counter() - t0) * 1e3)
    finally:
        loader_module.pack = pack


@one_line_errors
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_config_args(parser, "config overrides (data.shards_dir, data.batch_size, data.workers, ...)")
    parser.add_argument("--epochs", type=positive, default=4, help="epochs per variant (default 4)")
    parser.add_argument("--step-ms", type=float, default=60.0,
                        help="the consumer's time between batches, in ms (default 60)")
    args = parser.parse_args(argv)
    cfg = load_run_config(args, "batch_handover")
    if cfg.data.workers < 1:
        sys.exit("batch_handover: data.workers must be >= 1 (without workers nothing is handed over)")
    print(f"torch {torch.__version__}; {args.config} {' '.join(args.overrides)}; batch {cfg.data.batch_size}, "
          f"{cfg.model.img_size} px, {cfg.data.workers} workers, {args.step_ms:g} ms between batches, "
          f"{args.epochs} epochs each")
    times = {"packed": [], "per tensor": []}
    for epoch in range(args.epochs):
        for name in times:
            times[name] += handover_ms(cfg, epoch, args.step_ms, packed=name == "packed")
    ms = {name: statistics.median(t) for name, t in times.items()}
    print(f"\n{'':12s}{'ms per batch':>14s}{'batches':>9s}")
    for name, t in times.items():
        print(f"{name:12s}{ms[name]:14.2f}{len(t):9d}")
    print(f"\nper tensor / packed: {ms['per tensor'] / ms['packed']:.2f}x")


if __name__ == "__main__":
    main()
