"""What the trainer costs beyond the model, side by side in one run:

- ``plain step``: the model, the objective and AdamW on batches already on the device (on CUDA with
  bf16 autocast and fused AdamW when the DeepSpeed config asks for bf16): the model's own rate;
- ``trainer``: ``python -m modsquad_ds.train`` with the same config (DeepSpeed engine, statistics,
  usage sums, logging, loader workers), its second logging window (the first holds the warm-up),
  with the share of that window it waited for batches (``perf/data_wait_pct``);
- ``loader``: the training loader alone, with the config's workers, against the model's consumption;
- ``dense plain step``: the dense MTL ViT of the same width and depth, for the peak memory beside it.

Goal (issue 7): trainer >= 0.9x the plain step's images/s. The trainer runs as one process (world
size 1), so the ratio prices the engine and the bookkeeping, not communication.

    python benchmarks/trainer_overhead.py                      # CPU: configs/demo.yaml (make demo makes its shards)
    python benchmarks/trainer_overhead.py --set data.batch_size=32 --set preset=small \\
        --set train.ds_config=ds_configs/zero1_bf16.json --set data.shards_dir=DIR     # CUDA
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli import ROOT, add_run_config_args, load_run_config, one_line_errors, positive  # noqa: E402
from train_step import Variant, _peak_bytes, _step_batched, _sync  # noqa: E402

from modsquad_ds.data.loader import build_train_loader  # noqa: E402
from modsquad_ds.distributed.ds_config import ds_config_for_run  # noqa: E402
from modsquad_ds.model import build_dense_peer, build_model  # noqa: E402
from modsquad_ds.model.objective import MultiTaskObjective  # noqa: E402
from modsquad_ds.train.module import to_device  # noqa: E402



def loader_rate(cfg, batches: int) -> float:
    """Images/s of the training loader alone (rank 0 of 1, the config's workers), after its first batch."""
    it = iter(build_train_loader(cfg, 0, 1, 0))
    next(it)  # worker start-up is not the steady rate
    t0, images = time.perf_counter(), 0
    for batch in itertools.islice(it, batches):
        images += batch["image"].shape[0]
    return images / (time.perf_counter() - t0)


def plain_rate(cfg, model, bf16: bool, steps: int, device, windows: int = 3) -> tuple[float, int]:
    """Images/s and peak bytes (CUDA; 0 elsewhere) of the plain step on real batches held in memory:
    the median of ``windows`` windows of ``steps`` back-to-back steps (a window, like the trainer's
    logging window, lets a GPU overlap one step's launches with the last one's kernels)."""
    batches = [to_device(b, device) for b in itertools.islice(iter(build_train_loader(cfg, 0, 1, 0)), 4)]
    step = Variant("plain", model, MultiTaskObjective(cfg), _step_batched, device, bf16=bf16)
    for batch in batches[:2]:
        step(batch)  # warm-up
    peak = _peak_bytes(step, batches[0]) if device.type == "cuda" else 0
    rates = []
    for _ in range(windows):
        _sync(device)
        t0 = time.perf_counter()
        for batch in itertools.islice(itertools.cycle(batches), steps):
            step(batch)
        _sync(device)
        rates.append(steps * batches[0]["image"].shape[0] / (time.perf_counter() - t0))
    return statistics.median(rates), peak


def trainer_rate(config: str, overrides: list[str], steps: int) -> dict:
    """The real trainer for 2 x ``steps`` steps logged in two windows; the second window's numbers."""
    with tempfile.TemporaryDirectory(prefix="trainer_overhead_") as out:
        cmd = [sys.executable, "-m", "modsquad_ds.train", "--config", config]
        for item in [*overrides, f"train.steps={2 * steps}", f"train.log_every={steps}", "train.checkpoint_every=0",
                     "train.eval_every=0", "train.stop_after=null", "train.warmup_steps=1", f"train.out_dir={out}"]:
            cmd += ["--set", item]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"trainer_overhead: the trainer failed (exit {done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    return {"images_per_s": last["perf/images_per_s"], "data_wait_pct": last["perf/data_wait_pct"],
            "max_memory_gib": last.get("perf/max_memory_gib")}


@one_line_errors
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_config_args(parser, "config overrides, for the trainer and the plain step alike")
    parser.add_argument("--steps", type=positive, default=None, help="timed steps (default 10 CPU, 30 CUDA)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    cfg = load_run_config(args, "trainer_overhead")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps = args.steps or (30 if device.type == "cuda" else 10)
    bf16 = device.type == "cuda" and ds_config_for_run(cfg).get("bf16", {}).get("enabled", False)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}; {args.config} {' '.join(args.overrides)}; "
          f"batch {cfg.data.batch_size}, {'bf16' if bf16 else 'fp32'}, {steps} timed steps, "
          f"data.workers {cfg.data.workers}")

    torch.manual_seed(0)
    plain, plain_peak = plain_rate(cfg, build_model(cfg), bf16, steps, device)
    dense, dense_peak = plain_rate(cfg, build_dense_peer(cfg), bf16, steps, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the trainer runs in another process, on the same GPU
    trainer = trainer_rate(args.config, args.overrides, steps)
    loader = loader_rate(cfg, max(steps, 8))

    rows = [("plain step (model only)", plain, ""),
            ("trainer", trainer["images_per_s"], f"waited for data {trainer['data_wait_pct']:.1f}% of the window"),
            ("loader alone", loader, f"{cfg.data.workers} workers; {loader / plain:.2f}x what the model consumes"),
            ("dense plain step (peer)", dense, "")]
    print(f"\n{'':26s}{'images/s':>10s}  {'vs plain':>8s}")
    for name, rate, note in rows:
        print(f"{name:26s}{rate:10.1f}  {rate / plain:7.2f}x  {note}")
    if device.type == "cuda":
        gib = 2 ** 30
        print(f"\npeak memory: plain step {plain_peak / gib:.2f} GiB, dense plain step {dense_peak / gib:.2f} GiB "
              f"({plain_peak / max(dense_peak, 1):.2f}x), trainer {trainer['max_memory_gib']:.2f} GiB")
    print(f"\ntrainer / plain step: {trainer['images_per_s'] / plain:.2f}x (goal >= 0.9x)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "plain_images_per_s": plain, "trainer": trainer, "loader_images_per_s": loader,
            "dense_images_per_s": dense, "plain_peak_bytes": plain_peak, "dense_peak_bytes": dense_peak,
            "trainer_vs_plain": trainer["images_per_s"] / plain}, indent=2))


if __name__ == "__main__":
    main()
