"""Task-batched forward/backward vs a loop over tasks (the reference code's one-forward-per-task).

Both compute the same loss and gradients (tests/unit/model/test_vit.py proves the forwards equal);
the batched form runs the task-independent prefix once and every layer once over all task slots,
so each matmul is T times larger. Prints the ratio measured side by side in one run (the two
alternating, medians).

    .venv/bin/python benchmarks/task_batched.py [--presets tiny small] [--batch 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _cli import one_line_errors, positive
from modsquad_ds.config import load_config
from modsquad_ds.data.synthetic import synthetic_batch
from modsquad_ds.model import build_model
from modsquad_ds.model.objective import MultiTaskObjective


def step_batched(model, objective, batch):
    loss, _ = objective(model(batch["image"]), batch)
    loss.backward()


def step_loop(model, objective, batch):
    """One forward per task, as the reference code trains; the MI table is summed over the passes."""
    outs = [model(batch["image"], [task]) for task in model.task_names]
    merged = outs[0]
    for out in outs[1:]:
        merged.preds.update(out.preds)
        for mine, theirs in zip(merged.routing, out.routing):
            mine.prob_table_TE = mine.prob_table_TE + theirs.prob_table_TE
            mine.count_table_TE = mine.count_table_TE + theirs.count_table_TE
    loss, _ = objective(merged, batch)
    loss.backward()


def measure(steps: dict, model, objective, batch, repeats: int) -> dict[str, float]:
    """Median seconds of each step function, run round robin (outside load hits them alike)."""
    for step in steps.values():
        step(model, objective, batch)  # warm-up
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            step(model, objective, batch)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


@one_line_errors
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--batch", type=positive, default=4, help="images per step (every image has all 13 tasks)")
    parser.add_argument("--repeats", type=positive, default=5)
    parser.add_argument("--img-size", type=int, default=None, help="override the preset's image size")
    parser.add_argument("--threads", type=positive, default=2, help="torch CPU threads (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch} images x 13 tasks")
    print(f"{'preset':<8}{'batched ms':>12}{'loop ms':>10}{'loop / batched':>16}")
    for preset in args.presets:
        overrides = ["moe.router_noise=false"]
        if args.img_size:
            overrides.append(f"model.img_size={args.img_size}")
        cfg = load_config(preset=preset, overrides=overrides)
        torch.manual_seed(0)
        model, objective = build_model(cfg), MultiTaskObjective(cfg)
        batch = synthetic_batch(cfg.tasks.names, args.batch, cfg.model.img_size, torch.Generator().manual_seed(0))
        seconds = measure({"batched": step_batched, "loop": step_loop}, model, objective, batch, args.repeats)
        batched, loop = seconds["batched"], seconds["loop"]
        print(f"{preset:<8}{batched * 1e3:>12.1f}{loop * 1e3:>10.1f}{loop / batched:>15.2f}x", flush=True)


if __name__ == "__main__":
    main()
