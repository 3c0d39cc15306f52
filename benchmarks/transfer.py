"""Router fine-tuning vs full fine-tuning vs head-only training on new tasks (paper Sec. 4.4, Fig. 4).

1. A source run learns the tiny preset on the 11 Taskonomy tasks other than class_object and
   class_scene (the paper's split), on the mini-Taskonomy (the demo's 160 views, at 32 px).
2. Each mode learns class_object and class_scene from the same ``data.fraction`` subset of the
   training split, same steps, same learning rate, same seed (new routers and heads start equal):
   ``routers`` (routers + task embedding + heads), ``heads`` (heads only), ``all`` (every weight),
   and, as the floor, ``scratch`` (a fresh model trained on the same subset).
3. Each is evaluated on the training split's samples *outside* the subset (never seen in
   fine-tuning): loss and top-1 accuracy against the label's top class, per new task.

Every step is the real training command (printed before it runs); the table compares trainable
parameters, training wall time (including start-up) and held-out quality side by side.

    .venv/bin/python benchmarks/transfer.py [--fraction 0.05] [--source-steps 200] [--steps 100]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from _cli import positive
from modsquad_ds.config.schema import PAPER_TASKS

ROOT = Path(__file__).resolve().parents[1]
NEW_TASKS = ["class_object", "class_scene"]
SOURCE_TASKS = [t for t in PAPER_TASKS if t not in NEW_TASKS]
MODES = ["routers", "heads", "all", "scratch"]
SOURCE_WARMUP = 10  # warm-up steps of the source run


def run(cmd: list[str]) -> float:
    print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.perf_counter() - t0


def make_data(data: Path) -> Path:
    raw, shards = data / "raw", data / "shards"
    py = sys.executable
    if not (raw / "splits").is_dir():
        # the demo's views at the tiny preset's own 32 px: decoding, not the model, bounds a tiny step
        run([py, "-m", "data_tools.mini_taskonomy", "--out", str(raw), "--buildings", "8", "--points", "5",
             "--views", "4", "--resolution", "32", "--workers", "2"])
    if not (shards / "train.index.json").is_file():
        run([py, "-m", "data_tools.make_shards", "--root", str(raw), "--split", "train",
             "--split-csv", str(raw / "splits" / "train_val_test_mini.csv"), "--out", str(shards)])
    return shards


def train_cmd(*sets: str, config: list[str] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "modsquad_ds.train", *(a for c in config for a in ("--config", c)), "--no-resume"]
    for item in sets:
        cmd += ["--set", item]
    return cmd


@torch.no_grad()
def held_out_quality(run_dir: Path) -> dict[str, dict[str, float]]:
    """Loss and top-1 accuracy per new task on the training split minus the fine-tuning subset."""
    from modsquad_ds.data.loader import build_eval_loader
    from modsquad_ds.data.shard_index import index_path, load_index
    from modsquad_ds.data.subset import subset_positions
    from modsquad_ds.data.tasks import get_task
    from modsquad_ds.data.tar_reader import read_span
    from modsquad_ds.export.reader import load_checkpoint_weights
    from modsquad_ds.model.objective import MultiTaskObjective
    from modsquad_ds.model.vit import ModSquadViT

    weights = load_checkpoint_weights(run_dir)
    cfg = weights.config
    model = ModSquadViT(cfg.model, cfg.moe, cfg.tasks.names)
    model.load_state_dict(weights.model)
    model.eval()
    objective = MultiTaskObjective(cfg)
    index = load_index(index_path(cfg.data.shards_dir, cfg.data.train_split))
    stored = [r.key for s in index.shards for r in read_span(s.path, s.name, 0, s.samples, set())]
    seed = cfg.data.seed if cfg.data.seed is not None else cfg.seed
    seen = {stored[p] for p in subset_positions(len(stored), cfg.data.fraction, seed)}
    sums = {t: {"loss": 0.0, "correct": 0.0} for t in cfg.tasks.names}
    count = 0
    for batch in build_eval_loader(cfg, 0, 1, split=cfg.data.train_split):
        keep = torch.tensor([k not in seen for k in batch["keys"]])
        if not keep.any():
            continue
        batch = {"image": batch["image"][keep], "targets": {t: v[keep] for t, v in batch["targets"].items()},
                 "masks": {t: v[keep] for t, v in batch.get("masks", {}).items()}}
        out = model(batch["image"])
        n = int(keep.sum())
        for task, loss in objective.task_losses(out, batch).items():
            sums[task]["loss"] += float(loss) * n
            if get_task(task).kind == "class":  # soft labels: a hit predicts the label's top class
                hits = out.preds[task].argmax(-1) == batch["targets"][task].argmax(-1)
                sums[task]["correct"] += float(hits.sum())
        count += n
    return {t: {"loss": v["loss"] / count, "top1": v["correct"] / count, "images": count} for t, v in sums.items()}


def trainable_share(run_dir: Path, mode: str) -> tuple[int, int]:
    from modsquad_ds.config.loader import load_config
    from modsquad_ds.finetune import freeze
    from modsquad_ds.model.objective import MultiTaskObjective
    from modsquad_ds.model.vit import ModSquadViT
    from modsquad_ds.train.module import TrainModule

    cfg = load_config([run_dir / "config.yaml"])
    module = TrainModule(ModSquadViT(cfg.model, cfg.moe, cfg.tasks.names), MultiTaskObjective(cfg), lambda t: t)
    report = freeze(module, mode)
    return report.trainable, report.trainable + report.frozen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data_cache/mini_taskonomy_32", help="mini-Taskonomy folder (made if absent)")
    parser.add_argument("--out", default="runs/transfer", help="folder for the source and fine-tuned runs")
    parser.add_argument("--fraction", type=float, default=0.05, help="share of the training split to learn from")
    parser.add_argument("--source-steps", type=int, default=200, help="steps of the source run (>= 10: its "
                        "warm-up)")
    parser.add_argument("--steps", type=positive, default=100, help="optimizer steps of each fine-tuning mode")
    parser.add_argument("--batch", type=positive, default=2, help="images per step in fine-tuning")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    args = parser.parse_args(argv)
    if args.source_steps < SOURCE_WARMUP:
        parser.error(f"--source-steps must be >= {SOURCE_WARMUP} (the source run's warm-up), got {args.source_steps}")
    if not 0 < args.fraction <= 1:
        parser.error(f"--fraction must be in (0, 1], got {args.fraction}")

    shards = make_data(Path(args.data))
    out = Path(args.out)
    src = out / "source"
    source_seconds = float("nan")
    if not (src / "checkpoints" / f"step_{args.source_steps:08d}").is_dir():
        source_seconds = run(train_cmd(
            f"data.shards_dir={shards}", f"tasks.names=[{','.join(SOURCE_TASKS)}]", "data.batch_size=4",
            "data.workers=1", f"train.steps={args.source_steps}", f"train.warmup_steps={SOURCE_WARMUP}", "train.lr=1e-3",
            "train.log_every=25", f"train.out_dir={src}", config=["configs/demo.yaml"]))
    rows = []
    for mode in args.modes:
        run_dir = out / f"{mode}_{args.fraction:g}"
        common = [f"tasks.names=[{','.join(NEW_TASKS)}]", f"data.fraction={args.fraction}",
                  f"data.batch_size={args.batch}", "data.workers=0", f"train.steps={args.steps}",
                  "train.warmup_steps=0", f"train.lr={args.lr}", "train.log_every=10", "train.checkpoint_every=0",
                  f"train.out_dir={run_dir}"]
        if mode == "scratch":
            cmd = train_cmd(f"data.shards_dir={shards}", *common, "train.ds_config=ds_configs/zero1_fp32.json")
        else:
            cmd = train_cmd(f"finetune.mode={mode}", f"finetune.init_from={src}", *common,
                            config=[str(src / "config.yaml")])
        seconds = run(cmd)
        last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        trainable, total = trainable_share(run_dir, "all" if mode == "scratch" else mode)
        rows.append((mode, trainable, total, seconds, last.get("loss/total", float("nan")),
                     held_out_quality(run_dir)))

    subset = json.loads((shards / "train.index.json").read_text())["num_samples"]
    print(f"\nsource: {len(SOURCE_TASKS)} tasks, {args.source_steps} steps"
          + (f" ({source_seconds:.0f} s)" if source_seconds == source_seconds else " (reused)")
          + f"; new tasks {', '.join(NEW_TASKS)} from data.fraction {args.fraction} "
          f"({max(1, round(args.fraction * subset))} of {subset} training images), {args.steps} steps each")
    head = " | ".join(f"{t} loss | {t} top-1" for t in NEW_TASKS)
    print(f"| mode | trainable params | share | train time (s) | final train loss | {head} |")
    print("|---|---:|---:|---:|---:|" + "---:|" * (2 * len(NEW_TASKS)))
    for mode, trainable, total, seconds, loss, quality in rows:
        cells = " | ".join(f"{quality[t]['loss']:.3f} | {100 * quality[t]['top1']:.1f}%" for t in NEW_TASKS)
        print(f"| {mode} | {trainable:,} | {100 * trainable / total:.2f}% | {seconds:.0f} | {loss:.3f} | {cells} |")
    images = rows[0][5][NEW_TASKS[0]]["images"] if rows else 0
    print(f"held out: the {images} training images outside the subset")
    return 0


if __name__ == "__main__":
    sys.exit(main())
