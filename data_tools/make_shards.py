r"""Convert a raw Taskonomy release folder into WebDataset tar shards plus a per-split index.

Input:  {root}/{domain}/taskonomy/{building}/point_{p}_view_{v}_domain_{domain}.{png,npy}
        and a split CSV (id,train,val,test; bare-CR line endings as in the release).
Output: {out}/{split}-000000.tar ...   one sample per key {building}__point_{p}_view_{v}, members
                                       {key}.{domain}.{ext}, copied byte for byte (16-bit stays 16-bit)
        {out}/{split}-000000.tar.json  sidecar: samples, bytes, sha256 (written when the shard is done)
        {out}/{split}.index.json       shard names, counts, sizes, checksums, the scan summary
        {out}/{split}.summary.json     missing domains, excluded buildings, unreadable files

Samples are paired by (building, point, view), shuffled with --seed across all buildings, and cut
into shards of --samples-per-shard (or of about --shard-size-mb). Finished shards are never rewritten,
so rerunning the same command resumes. Split the work over machines with a Slurm array:

    #SBATCH --array=0-31
    python -m data_tools.make_shards --root /data/taskonomy --split-csv splits/train_val_test_full.csv \
        --split train --out /data/shards --job-index $SLURM_ARRAY_TASK_ID --num-jobs $SLURM_ARRAY_TASK_COUNT

The job that finishes last writes the index (any job can also write it later with --index-only).
Check the result with: python -m data_tools.verify_shards --index /data/shards/train.index.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tqdm import tqdm  # noqa: E402

from data_tools.sharding import (Plan, is_finished, make_plan, remove_unfinished, try_write_index,  # noqa: E402
                                 write_shard, written_by_other_plans)
from data_tools.stopping import Stopped, StopSignals  # noqa: E402
from data_tools.worker_pool import WorkerFailed, imap_unordered  # noqa: E402
from modsquad_ds.config.schema import PAPER_TASKS  # noqa: E402
from modsquad_ds.data.layout import read_split_csv  # noqa: E402
from modsquad_ds.data.sample import needed_domains  # noqa: E402
from modsquad_ds.data.tasks import is_depth_masked  # noqa: E402

DEFAULT_DOMAINS = needed_domains(PAPER_TASKS)


def shard_range_arg(text: str) -> tuple[int, int | None]:
    """``START:END`` (either end may be empty) -> (start, end or None for "to the last shard")."""
    try:
        a, b = text.split(":")
        return int(a or 0), (int(b) if b else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must look like START:END, e.g. 0:100 or 40:") from None


def job_range(n: int, job_index: int, num_jobs: int) -> range:
    """Contiguous block of shards for job ``job_index`` of ``num_jobs`` (sizes differ by at most 1)."""
    lo = n * job_index // num_jobs
    hi = n * (job_index + 1) // num_jobs
    return range(lo, hi)


def _one_torch_thread() -> None:
    """Writers that resize do it with torch: one thread each, or N writers x N threads oversubscribe."""
    import torch

    torch.set_num_threads(1)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m data_tools.make_shards", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="raw release root (holds one folder per domain)")
    ap.add_argument("--out", required=True, help="output folder for shards, sidecars and the index")
    ap.add_argument("--split-csv", help="release split CSV; omit to shard every building on disk")
    ap.add_argument("--split", default="train", help="split column of the CSV to shard (default train); "
                    "also the shard name prefix")
    ap.add_argument("--domains", nargs="+", default=DEFAULT_DOMAINS,
                    help="domains to pack (default: rgb, depth_zbuffer and the paper's 13 task domains)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sample order (default 0)")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--samples-per-shard", type=int, help="samples per shard (exact)")
    size.add_argument("--shard-size-mb", type=float, default=1024.0,
                      help="target shard size in MB, estimated from 64 samples' file sizes (default 1024)")
    ap.add_argument("--resize", type=int, metavar="PX",
                    help="downscale every sample to PX x PX while writing, with task-correct resizing "
                    "(nearest for ids, mask-aware averages for depth and other maps, renormalised normals; "
                    "see data_tools/downscale.py); the index records it and training refuses another "
                    "model.img_size. Cuts the loader's work per sample ~4x at 512 -> 224 px. Default: copy "
                    "files byte for byte")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel writer processes")
    ap.add_argument("--job-index", type=int, default=0, help="this job's index in an array (0-based)")
    ap.add_argument("--num-jobs", type=int, default=1, help="number of jobs sharing the work")
    ap.add_argument("--shard-range", type=shard_range_arg, metavar="START:END",
                    help="explicit shard range (overrides --job-index)")
    ap.add_argument("--index-only", action="store_true", help="write nothing but the index (all shards done)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def _refuse(message: str) -> int:
    print(f"make_shards: error: {message}", file=sys.stderr)
    return 2


def _png_size(path: str) -> tuple[int, int] | None:
    """(height, width) from a PNG's header, without decoding it; None for another format."""
    with open(path, "rb") as f:
        head = f.read(24)
    if not head.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    return int.from_bytes(head[20:24], "big"), int.from_bytes(head[16:20], "big")


def _too_small_to_resize(plan: Plan, size: int) -> str | None:
    """Why the release cannot be downscaled to ``size`` (its first sample's maps are smaller), or None.
    Checked once up front: otherwise every sample would be decoded, then left out for the same reason."""
    for domain, path in plan.shards[0].samples[0][1].items():
        try:
            hw = _png_size(path)
        except OSError:
            continue  # an unreadable file is the writer's to report, for that sample alone
        if hw is not None and min(hw) < size:
            return f"--resize {size}: the release's {domain} maps are {hw[0]}x{hw[1]}, and shards never upsample"
    return None


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not Path(args.root).is_dir():
        ap.error(f"--root {args.root}: no such folder")
    if not 0 <= args.job_index < args.num_jobs:
        ap.error(f"--job-index {args.job_index} must be in [0, --num-jobs={args.num_jobs})")
    if args.samples_per_shard is not None and args.samples_per_shard < 1:
        ap.error("--samples-per-shard must be >= 1")
    if args.shard_size_mb <= 0:
        ap.error("--shard-size-mb must be > 0")
    if args.workers < 1:
        ap.error("--workers must be >= 1")
    if args.resize is not None:
        if args.resize < 8:
            ap.error("--resize must be >= 8 pixels")
        masked = [d for d in args.domains if is_depth_masked(d)]
        if masked and "depth_zbuffer" not in args.domains:
            ap.error(f"--resize averages {', '.join(masked)} over depth_zbuffer's valid pixels: "
                     "add depth_zbuffer to --domains")
    buildings = None
    if args.split_csv:
        try:
            splits = read_split_csv(args.split_csv)
        except (OSError, ValueError) as err:
            ap.error(f"--split-csv: {err}")
        if args.split not in splits:
            ap.error(f"--split {args.split!r} is not a column of {args.split_csv} ({', '.join(splits)})")
        buildings = splits[args.split]
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        ap.error(f"--out {args.out}: cannot create the folder ({err.strerror or err})")
    plan = make_plan(args.root, out, args.split, list(args.domains), buildings, args.seed,
                     args.samples_per_shard, int(args.shard_size_mb * 1e6), args.resize)
    s = plan.summary
    print(f"[{args.split}] {s['complete_samples']} complete samples -> {len(plan.shards)} shards of "
          f"{plan.samples_per_shard}; incomplete {s['incomplete_samples']} {s['missing_files_per_domain']}; "
          f"missing domain folders {s['missing_domain_dirs']}; excluded buildings {s['excluded_buildings']}; "
          f"buildings in the CSV but not on disk {s['absent_buildings']}")
    (out / f"{args.split}.summary.json").write_text(json.dumps(s, indent=1))
    if not plan.shards:
        print("nothing to write: no complete sample (see the summary above)", file=sys.stderr)
        return 1
    if args.resize is not None and (why := _too_small_to_resize(plan, args.resize)):
        return _refuse(why)
    if other := written_by_other_plans(plan, out):
        return _refuse(f"{other[0]} and {len(other) - 1} more shards in {out} were written with other options "
                       "(--seed, --samples-per-shard, --shard-size-mb, --domains, --resize) or from another "
                       "release: rerun with the original options, or write to another --out")
    if args.index_only:
        missing = [j.name for j in plan.shards if not is_finished(out, j.name)]
        if missing:
            return _refuse(f"--index-only: {len(missing)} shards are not written yet ({', '.join(missing[:3])}"
                           f"{', ...' if len(missing) > 3 else ''}); run their jobs first")
    else:
        status = _write_my_shards(args, plan, out)
        if status:
            return status
    try:
        index = try_write_index(plan, out)
    except RuntimeError as err:  # another job wrote some shards with other options meanwhile
        return _refuse(str(err))
    if index is None:
        left = sum(not is_finished(out, j.name) for j in plan.shards)
        print(f"[{args.split}] {left} shards of other jobs not finished yet; the last job writes the index")
    else:
        print(f"[{args.split}] index written: {index}")
    return 0


def _write_my_shards(args: argparse.Namespace, plan: Plan, out: Path) -> int:
    """Write this job's unfinished shards; 0, or the exit status to end with."""
    n = len(plan.shards)
    if args.shard_range:
        lo, hi = args.shard_range
        mine = range(max(0, lo), min(n, n if hi is None else hi))
    else:
        mine = job_range(n, args.job_index, args.num_jobs)
    todo = [plan.shards[i] for i in mine if not is_finished(out, plan.shards[i].name)]
    names = [job.name for job in todo]
    print(f"[{args.split}] shards {mine.start}..{mine.stop - 1}: {len(mine) - len(todo)} already done, "
          f"{len(todo)} to write")
    stale = remove_unfinished(out, names)
    if stale:
        print(f"[{args.split}] removed {stale} unfinished files of an earlier run")
    bar = tqdm(total=len(todo), unit="shard", desc=f"{args.split} shards", disable=args.no_progress)
    skipped, kept, written = [], 0, 0  # written: bar.n stays 0 with the bar disabled
    writing = imap_unordered(write_shard, todo, args.workers, setup=_one_torch_thread if args.resize else None,
                             describe=lambda job: f"writing {job.name}")
    try:  # writers ignore Ctrl-C and SIGTERM: only this process reacts, and ends them
        with StopSignals() as stop, contextlib.closing(writing) as sidecars:
            for _, side in sidecars:
                skipped += side["skipped"]
                kept += side["samples"]
                written += 1
                bar.update()
                stop.check()
            stop.check()
    except (KeyboardInterrupt, Stopped) as stopped:
        bar.close()
        # closing the pool has killed the writers; what they left half-written goes
        removed = remove_unfinished(out, names)
        how = "stopped by SIGTERM" if isinstance(stopped, Stopped) else "interrupted"
        print(f"[{args.split}] {how}: {written} of {len(todo)} shards written, {removed} unfinished "
              "files removed; run the same command to resume", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(stopped, Stopped) else signal.SIGINT)
    except (WorkerFailed, OSError) as err:  # a disk full, a writer killed by the OOM killer, a bug
        bar.close()
        removed = remove_unfinished(out, names)
        lines = str(err).strip().splitlines()  # a worker's: "writing X failed:", its traceback, the error
        what = lines[0] if len(lines) == 1 else f"{lines[0].rstrip(':')}: {lines[-1]}"
        print(f"[{args.split}] error: {what}; {written} of {len(todo)} shards written, {removed} unfinished "
              "files removed; rerun to resume", file=sys.stderr)
        return 1
    bar.close()
    if skipped:
        print(f"[{args.split}] {len(skipped)} samples had unreadable files and were left out "
              "(listed in the shard sidecars and the index summary)")
    if todo and not kept:
        print(f"[{args.split}] error: every sample of these shards was left out; the first: "
              f"{skipped[0]['key']}: {skipped[0]['reason']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # while scanning or indexing: nothing half-written to clean up
        print("interrupted; run the same command to resume", file=sys.stderr)
        sys.exit(130)
