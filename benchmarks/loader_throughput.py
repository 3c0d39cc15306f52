"""Loader throughput: sharded WebDataset loader vs the raw-folder reader vs what training consumes.

All numbers come from one run on one machine:
  1. write a mini-Taskonomy release (or reuse --data) and shard it with data_tools.make_shards;
  2. samples/s of the shard loader and of the raw-folder reader (same workers, same decode, same
     batch, same tasks), at the tiny preset's and the small preset's input sizes; with --cold the
     page cache of every data file is dropped (posix_fadvise DONTNEED) before each measurement, the
     situation of a first epoch or of a data set larger than RAM;
  3. samples/s that the tiny and small models consume in training (forward over all 13 tasks,
     objective, backward, AdamW step) on batches from the loader.
Goals (issue): shard loader >= 3x the raw reader and >= 2x each model's consumption, 2 workers.

    python benchmarks/loader_throughput.py                 # defaults: 128 px, 192 views, 2 workers
    python benchmarks/loader_throughput.py --cold --resolution 256
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from modsquad_ds.config import load_config  # noqa: E402
from modsquad_ds.data.loader import build_raw_loader, build_shard_loader  # noqa: E402


def drop_page_cache(root: Path) -> int:
    """Ask the kernel to forget cached pages of every file under ``root`` (no root rights needed)."""
    n = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                n += 1
            finally:
                os.close(fd)
    return n


def loader_rate(build, cfg, epochs: int, cold_roots: list[Path] | None) -> tuple[float, int]:
    """Samples/s over whole epochs, worker start-up included (a fresh loader per epoch, as in training)."""
    samples, elapsed = 0, 0.0
    for epoch in range(epochs):
        if cold_roots:
            for r in cold_roots:
                drop_page_cache(r)
        t0 = time.perf_counter()
        for batch in build(cfg, cfg.data.train_split, 0, 1, epoch):
            samples += batch["image"].shape[0]
        elapsed += time.perf_counter() - t0
    return samples / elapsed, samples


def train_rate(preset: str, batch: dict, steps: int) -> float:
    from modsquad_ds.model import build_model
    from modsquad_ds.model.objective import MultiTaskObjective

    cfg = load_config(preset=preset)
    torch.manual_seed(0)
    model = build_model(cfg)
    objective = MultiTaskObjective(cfg)
    opt = torch.optim.AdamW(list(model.parameters()) + list(objective.parameters()), lr=1e-4)
    model.train()

    def step():
        out = model(batch["image"])
        loss, _ = objective(out, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up (allocations, first-call overheads)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch["image"].shape[0] / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/tmp/modsquad_bench", help="work folder (raw release + shards)")
    ap.add_argument("--resolution", type=int, default=128, help="stored resolution of the mini release")
    ap.add_argument("--buildings", type=int, default=8)
    ap.add_argument("--points", type=int, default=8)
    ap.add_argument("--views", type=int, default=3)
    ap.add_argument("--samples-per-shard", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2, help="epochs per loader measurement")
    ap.add_argument("--train-steps", type=int, default=5, help="timed steps per model (small is slow on CPU)")
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each loader epoch")
    args = ap.parse_args(argv)

    from data_tools import make_shards
    from data_tools.mini_taskonomy import generate

    work = Path(args.data) / f"r{args.resolution}_b{args.buildings}_p{args.points}_v{args.views}"
    raw, shards = work / "raw", work / f"shards{args.samples_per_shard}"
    if not (raw / "splits").is_dir():
        generate(raw, buildings=args.buildings, points=args.points, views=args.views,
                 resolution=args.resolution, workers=os.cpu_count() or 1)
    if not (shards / "all.index.json").is_file():
        make_shards.main(["--root", str(raw), "--out", str(shards), "--split", "all", "--samples-per-shard",
                          str(args.samples_per_shard), "--no-progress"])
    n = args.buildings * args.points * args.views
    print(f"data: {n} views at {args.resolution} px, {len(list(shards.glob('*.tar')))} shards; "
          f"workers {args.workers}, batch {args.batch_size}, torch threads {torch.get_num_threads()}, "
          f"cache {'cold' if args.cold else 'warm'}")

    rows, first_batch = [], {}
    for preset in args.presets:
        over = [f"data.batch_size={args.batch_size}", f"data.workers={args.workers}", "data.train_split=all",
                f"data.shards_dir={shards}", f"data.raw_root={raw}"]
        cfg = load_config(preset=preset, overrides=over)
        cold = [raw, shards] if args.cold else None
        shard_rate, _ = loader_rate(build_shard_loader, cfg, args.epochs, cold)
        raw_rate, _ = loader_rate(build_raw_loader, cfg, args.epochs, cold)
        first_batch[preset] = next(iter(build_shard_loader(cfg, "all", 0, 1, 0)))
        rows.append((preset, cfg.model.img_size, shard_rate, raw_rate))

    print(f"\n{'preset':<7}{'img':>5}{'shards/s':>10}{'raw/s':>9}{'train/s':>9}"
          f"{'shards/raw':>12}{'shards/train':>14}")
    ok = True
    for preset, size, shard_rate, raw_rate in rows:
        consume = train_rate(preset, first_batch[preset], args.train_steps)
        r_raw, r_train = shard_rate / raw_rate, shard_rate / consume
        ok &= r_raw >= 3 and r_train >= 2
        print(f"{preset:<7}{size:>5}{shard_rate:>10.1f}{raw_rate:>9.1f}{consume:>9.1f}"
              f"{r_raw:>11.2f}x{r_train:>13.2f}x")
    print("\ngoals: shards/raw >= 3x, shards/train >= 2x:", "met" if ok else "NOT met (see docs/data.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
