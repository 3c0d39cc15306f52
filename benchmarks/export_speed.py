"""Per task: the exported (pruned) model's parameters, FLOPs and inference time against the full
Mod-Squad model running the same task on the same images, measured side by side in one run.

    python benchmarks/export_speed.py                      # ViT-S preset, routers specialised by construction
    python benchmarks/export_speed.py --run runs/demo      # a trained run (its training usage)

Without --run the model is the preset's, randomly initialised, with each task's routers made to use
only a random third of every MoE layer's experts (the sharp, differing usage the MI loss produces;
the paper's Fig. 4): the norms before MoE layers get a bias of 1 and the task's router columns of
the other experts a constant -1, so their logits are -embed_dim for every token. Usage then comes
from a calibration pass on random images and pruning uses --threshold (paper: 1.0%). With --run the
trained weights and the training usage are used instead. Times: median of --reps eval forwards of
--batch images in CPU time of the process (one thread by default), the two models interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _cli import one_line_errors, positive
from modsquad_ds.config import load_config
from modsquad_ds.export.prune import prune_plan, pruned_task_model
from modsquad_ds.export.task_model import TaskViT
from modsquad_ds.model.factory import build_dense_peer
from modsquad_ds.model.flops import count_params, forward_macs
from modsquad_ds.model.vit import ModSquadViT
from modsquad_ds.train.usage import UsageAccumulator


class Weights:
    def __init__(self, model, config):
        self.model, self.config = model, config


def specialised_model(preset: str, tasks: list[str], seed: int):
    cfg = load_config(preset=preset, overrides=[f"tasks.names=[{','.join(tasks)}]", f"seed={seed}"])
    torch.manual_seed(seed)
    model = ModSquadViT(cfg.model, cfg.moe, cfg.tasks.names).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if not hasattr(module, "router") or not name.startswith("blocks."):
                continue
            block = model.get_submodule(name.rsplit(".", 1)[0])
            norm = block.norm1 if name.endswith("attn") else block.norm2
            norm.bias.fill_(1.0)
            e = module.router.num_experts
            for t in range(len(tasks)):
                allowed = torch.randperm(e, generator=g)[: max(module.router.top_k, e // 3)]
                blocked = [x for x in range(e) if x not in set(allowed.tolist())]
                module.router.task_wg[t][:, blocked] = -1.0
    images = torch.randn(16, 3, cfg.model.img_size, cfg.model.img_size, generator=g)
    usage = UsageAccumulator(tasks)
    with torch.no_grad():
        for chunk in images.split(4):
            usage.add(model(chunk).routing)
    return cfg, model, usage.global_tables(), "calibration on 16 random images (routers specialised by construction)"


def trained_model(run: str):
    from pathlib import Path

    from modsquad_ds.export.pipeline import full_model
    from modsquad_ds.export.reader import load_checkpoint_weights
    from modsquad_ds.export.usage import training_usage

    weights = load_checkpoint_weights(run)
    tables, source = training_usage(Path(run), weights)
    return weights.config, full_model(weights), tables, source


def timed(fn):
    # CPU time of this process, not wall time: on a shared machine other jobs stretch wall times at
    # random, while the CPU work a forward needs stays put (one thread: no thread-pool waits counted)
    def run():
        t0 = time.process_time()
        fn()
        return time.process_time() - t0
    return run


@torch.no_grad()
@one_line_errors
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="a trained run folder (default: a specialised random model)")
    p.add_argument("--preset", default="small")
    p.add_argument("--tasks", nargs="+", default=["depth_zbuffer", "normal", "edge_texture", "class_scene"])
    p.add_argument("--threshold", type=float, default=1.0, help="percent (paper: 1.0)")
    p.add_argument("--batch", type=positive, default=8)
    p.add_argument("--reps", type=positive, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive, default=1, help="torch CPU threads (default 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    cfg, model, tables, source = trained_model(args.run) if args.run else specialised_model(args.preset, args.tasks, args.seed)
    tasks = list(cfg.tasks.names) if args.run else args.tasks
    dense = build_dense_peer(cfg).eval()
    images = torch.randn(args.batch, 3, cfg.model.img_size, cfg.model.img_size, generator=torch.Generator().manual_seed(1))
    probe = images[:1]
    print(f"preset {cfg.preset}, {cfg.model.img_size} px, batch {args.batch}, torch threads {torch.get_num_threads()}; "
          f"usage: {source}; threshold {args.threshold}%")
    print(f"full model {count_params(model) / 1e6:.2f} M params (all {len(cfg.tasks.names)} tasks), "
          f"dense multi-task ViT {count_params(dense) / 1e6:.2f} M")
    header = ("task", "kept", "params M", "vs full", "GFLOPs", "vs full", "full CPU ms", "pruned CPU ms", "speed-up",
              "max |diff|")
    print(" | ".join(header))
    for task in tasks:
        plan = prune_plan(tables, list(cfg.tasks.names).index(task), threshold=args.threshold / 100)
        config, state = pruned_task_model(Weights(model.state_dict(), cfg), task, plan)
        pruned = TaskViT(config)
        pruned.load_state_dict(state, strict=True)
        full_fn, pruned_fn = timed(lambda: model(images, [task])), timed(lambda: pruned(images))
        full_fn(), pruned_fn()  # warm-up
        full_t, pruned_t = [], []
        for _ in range(args.reps):  # interleaved
            full_t.append(full_fn())
            pruned_t.append(pruned_fn())
        full_ms, pruned_ms = statistics.median(full_t) * 1e3, statistics.median(pruned_t) * 1e3
        diff = (pruned(images) - model(images, [task]).preds[task]).abs().max().item()
        macs, full_macs = forward_macs(pruned, probe), forward_macs(model, probe, [task])
        kept = sum(len(x["kept"]) for x in plan.values())
        total = sum(x["num_experts"] for x in plan.values())
        n, n_full = count_params(pruned), count_params(model)
        print(f"{task} | {kept}/{total} | {n / 1e6:.2f} | {n / n_full:.1%} | {macs / 1e9:.3f} | {macs / full_macs:.1%} | "
              f"{full_ms:.1f} | {pruned_ms:.1f} | {full_ms / pruned_ms:.2f}x | {diff:.1e}")


if __name__ == "__main__":
    main()
