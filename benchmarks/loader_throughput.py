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

--per-core (release resolution, issue 10) replaces 2. and 3.: ONE loader worker, one torch thread,
and the rate counted per CPU-second the worker used (getrusage of the exited worker), which stays
meaningful on a machine shared with other jobs; side by side, full-size shards and shards written
with ``make_shards --resize <model input>``; a PNG decoder comparison (PIL vs torchvision); and the
cores one GPU needs at the rates it consumes (see gpu_rates()).

    python benchmarks/loader_throughput.py                 # defaults: 128 px, 192 views, 2 workers
    python benchmarks/loader_throughput.py --cold --resolution 256
    python benchmarks/loader_throughput.py --per-core --resolution 512 --buildings 2 --points 3 --views 4
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
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


def cpu_seconds() -> float:
    """CPU time of this process plus its exited children (the DataLoader's workers), all threads."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def per_core_rate(shards_dir: Path, preset: str, batch_size: int, epochs: int,
                  decoder: str = "pil") -> tuple[float, float]:
    """(samples per CPU-second, samples per wall second) of the shard loader with one worker."""
    over = [f"data.batch_size={batch_size}", "data.workers=1", "data.train_split=all",
            f"data.shards_dir={shards_dir}", f"data.png_decoder={decoder}"]
    cfg = load_config(preset=preset, overrides=over)
    samples, cpu0, t0 = 0, cpu_seconds(), time.perf_counter()
    for epoch in range(epochs):
        for batch in build_shard_loader(cfg, "all", 0, 1, epoch):
            samples += batch["image"].shape[0]
    return samples / (cpu_seconds() - cpu0), samples / (time.perf_counter() - t0)


def decoder_rates(shards_dir: Path, limit: int = 8) -> dict[str, float]:
    """ms of CPU per sample to decode every PNG member: PIL (the loader's) vs torchvision.io."""
    import tarfile

    from torchvision.io import ImageReadMode, decode_png

    from modsquad_ds.data.decode import decode_png as pil_decode

    blobs: dict[str, list[bytes]] = {}
    for tar in sorted(shards_dir.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf:
                if m.name.endswith(".png"):
                    blobs.setdefault(m.name.split(".")[0], []).append(tf.extractfile(m).read())
        if len(blobs) >= limit:
            break
    samples = list(blobs.values())[:limit]

    def tv(data):
        out = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.UNCHANGED)
        return out.numpy()

    rates = {}
    for name, fn in (("pil", pil_decode), ("torchvision", tv)):
        for data in samples[0]:  # same pixels both ways (16-bit included), or the comparison is void
            a, b = pil_decode(data), fn(data)
            b = b.transpose(1, 2, 0) if b.ndim == 3 and b.shape[0] in (1, 3) and b.shape[-1] not in (1, 3) else b
            assert np.array_equal(a, b.reshape(a.shape)), name
        t0 = time.process_time()
        for files in samples:
            for data in files:
                fn(data)
        rates[name] = 1000 * (time.process_time() - t0) / len(samples)
    return rates


def gpu_rates(presets: list[str]) -> list[tuple[str, str, float]]:
    """Images/s one GPU consumes in training: (preset, where the figure comes from, rate).

    - paper: ViT-B Mod-Squad, 3.79 M images x 100 epochs in 80 h on 240 V100 = 1,317 img/s, 5.5 per GPU.
    - H200, estimated (no GPU measurement exists yet): training FLOPs per image = 3 (forward +
      backward) x 2 x MACs per image and task (modsquad_ds.model.flops, this repo's model) x 13 tasks,
      over 989 TFLOP/s (H200 dense bf16 peak, NVIDIA's datasheet) x an MFU: the paper's own V100
      MFU (its 5.5 img/s at ViT-B's FLOPs over a V100's 125 TFLOP/s: ~7%) and 35% (a tuned ViT).
    """
    from modsquad_ds.model import build_model
    from modsquad_ds.model.flops import forward_macs

    rows = [("base", "paper: 240 V100, 1,317 img/s", 1317 / 240)]
    paper_train_flops = 3 * 2 * 19.7e9 * 13  # paper Table 2: 19.7 GFLOPs (MACs) per image and task
    paper_mfu = (1317 / 240) * paper_train_flops / 125e12
    for preset in presets:
        cfg = load_config(preset=preset)
        model = build_model(cfg).eval()
        size = cfg.model.img_size
        macs = forward_macs(model, torch.randn(1, 3, size, size), [cfg.tasks.names[0]])
        train_flops = 3 * 2 * macs * len(cfg.tasks.names)
        for mfu in (paper_mfu, 0.35):
            rows.append((preset, f"H200 estimate, {mfu:.0%} of 989 TFLOP/s", mfu * 989e12 / train_flops))
    return rows


def main_per_core(args, raw: Path, shards: Path) -> int:
    """Release-resolution loader rates per core, full-size vs shard-time-downscaled shards."""
    from data_tools import make_shards

    torch.set_num_threads(1)
    print(f"per-core: 1 loader worker, 1 torch thread, rate = samples / CPU-seconds used (main + worker); "
          f"batch {args.batch_size}, {args.epochs} epochs")
    print("PNG decode, ms CPU per sample (all PNG members):",
          ", ".join(f"{k} {v:.1f}" for k, v in decoder_rates(shards).items()))
    rows = []
    for preset in args.presets:
        size = load_config(preset=preset).model.img_size
        small = shards.parent / f"{shards.name}_resize{size}"
        if not (small / "all.index.json").is_file():
            make_shards.main(["--root", str(raw), "--out", str(small), "--split", "all", "--samples-per-shard",
                              str(args.samples_per_shard), "--no-progress", "--resize", str(size)])
        rate = {}
        for rep in range(args.repeats):  # interleaved, so outside load hits every variant alike
            for variant, folder, decoder in (("full", shards, "pil"), ("full", shards, "torchvision"),
                                             ("resize", small, "pil"), ("resize", small, "torchvision")):
                cpu, wall = per_core_rate(folder, preset, args.batch_size, args.epochs, decoder)
                rate.setdefault((variant, decoder), []).append(cpu)
                print(f"{preset} {variant:<6} {decoder:<11} {cpu:7.2f}/s per core ({wall:.2f}/s wall)")
        rate = {k: float(np.median(v)) for k, v in rate.items()}
        rows.append((preset, size, rate))
    print(f"\nsamples/s per core (median of {args.repeats}); columns: shards, decoder")
    print(f"{'preset':<7}{'img':>5}{'full,pil':>10}{'full,tv':>9}{'resize,pil':>12}{'resize,tv':>11}"
          f"{'best/full,pil':>15}")
    for preset, size, r in rows:
        best = max(r.values())
        print(f"{preset:<7}{size:>5}{r['full', 'pil']:>10.2f}{r['full', 'torchvision']:>9.2f}"
              f"{r['resize', 'pil']:>12.2f}{r['resize', 'torchvision']:>11.2f}{best / r['full', 'pil']:>14.1f}x")
    print(f"\n{'GPU rate (img/s per GPU)':<46}{'rate':>8}{'cores, full,pil':>17}{'cores, best':>13}")
    per = {size: (r["full", "pil"], max(r.values())) for _, size, r in rows}  # the loader depends on the size
    for preset, source, rate in gpu_rates(args.gpu_presets):
        size = load_config(preset=preset).model.img_size
        if size in per:
            f, s = per[size]
            print(f"{preset + ': ' + source:<46}{rate:>8.1f}{rate / f:>17.1f}{rate / s:>13.1f}")
    return 0


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
    ap.add_argument("--gpu-presets", nargs="+", default=["small", "base"],
                    help="--per-core: presets whose GPU consumption is compared (matched by input size)")
    ap.add_argument("--repeats", type=int, default=1, help="--per-core: rounds of the four variants")
    ap.add_argument("--per-core", action="store_true", help="one worker, rates per CPU-second, full-size vs "
                    "make_shards --resize shards, decoder comparison, cores per GPU (see the module doc)")
    args = ap.parse_args(argv)
    if args.per_core:  # it downscales the release to each preset's input size, never up
        for preset in args.presets:
            size = load_config(preset=preset).model.img_size
            if size > args.resolution:
                ap.error(f"--per-core: --resolution ({args.resolution}) is below preset {preset}'s input size "
                         f"({size} px), which the shards are downscaled to; use at least {size} or other --presets")

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
    if args.per_core:
        print(f"data: {n} views at {args.resolution} px")
        return main_per_core(args, raw, shards)
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
