"""Host work per training step, Mod-Squad against the dense MTL ViT: ops issued and host time.

A GPU step is only as fast as the host can issue its kernels: issue 7's first profile found the small
preset launch-bound (307 ms of host work for 158 ms of GPU work: a thousand matmul calls and 1,900
dtype casts per step). Both figures here need no GPU:

- ``kernels``: the aten ops one step issues that compute (each a kernel launch on a GPU), and
  ``views`` (aliasing ops: host work only). The count does not depend on the input's size.
- ``host ms``: one step on the CPU with next to nothing to compute (2 x 2 patches, one image per
  task, width 96; depth, experts, top-k and tasks those of the preset, so the same ops), in CPU
  seconds of the one thread: the host's share of a step (Python, autograd, the dispatcher). The
  step's ``grouped_mm`` calls are replayed alone and their CPU seconds taken out: on a CPU that op
  loops over the experts, on a GPU it is one kernel. A GPU adds its launch cost (a few microseconds
  per kernel) on top.

The step is the trainer's: the model as the trainer builds it (MoE MLP layers as DeepSpeed MoE at
ep_size 1, running the dropless dispatch), in bf16 as DeepSpeed's bf16 engines cast it, the
grouped expert kernel (the one picked on sm90+ GPUs), ``TrainModule`` forward (model, per-task
losses, MI loss) and backward. Variants side by side: ``dense`` (build_dense_peer), ``modsquad``,
``modsquad+ckpt`` (model.grad_checkpointing). The optimizer is left out: fused AdamW is a handful
of launches for any number of parameters. The meta device would measure the same without any
compute, but it runs attention as its unfused math and its Python meta kernels cost twice a CPU op.

    python benchmarks/host_overhead.py                  # small and base presets
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time
from pathlib import Path

import torch

from _cli import one_line_errors, positive
from torch.utils._python_dispatch import TorchDispatchMode

from modsquad_ds.config import load_config
from modsquad_ds.data.synthetic import synthetic_batch
from modsquad_ds.model import build_dense_peer, build_model
from modsquad_ds.model.objective import MultiTaskObjective
from modsquad_ds.moe.ds_adapter import convert_to_expert_parallel
from modsquad_ds.moe.kernels import set_kernel
from modsquad_ds.train.module import TrainModule


class OpCounter(TorchDispatchMode):
    """Counts the aten ops a region issues: ``kernels`` (ops that compute, each a launch on a GPU)
    and ``views`` (ops that only alias, host work alone); keeps its ``grouped_mm`` calls to replay."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.kinds = collections.Counter({"kernels": 0, "views": 0})
        self.grouped_mm_calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        self.kinds["views" if func.is_view else "kernels"] += 1
        if func.overloadpacket.__name__ == "_grouped_mm":
            self.grouped_mm_calls.append((func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))

    def grouped_mm_seconds(self, repeats: int) -> float:
        """Median CPU seconds of this region's ``grouped_mm`` calls, run again on their own."""
        times = []
        for _ in range(repeats):
            t0 = time.process_time()
            for func, args, kwargs in self.grouped_mm_calls:
                func(*args, **kwargs)
            times.append(time.process_time() - t0)
        return statistics.median(times)


def trainer_module(cfg, dense: bool, grad_checkpointing: bool = False) -> TrainModule:
    torch.manual_seed(0)
    model = build_dense_peer(cfg) if dense else build_model(cfg)
    if not dense:
        convert_to_expert_parallel(model, ep_size=1)
        set_kernel(model, "grouped")
    model.set_grad_checkpointing(grad_checkpointing)
    return TrainModule(model, MultiTaskObjective(cfg), lambda t: t).to(torch.bfloat16).train()


def step(module: TrainModule, batch) -> float:
    """Forward and backward; returns the CPU seconds they took (gradients are cleared after)."""
    t0 = time.process_time()  # CPU seconds: work done, not time spent waiting on a busy machine
    loss, _, _ = module(batch)
    loss.backward()
    seconds = time.process_time() - t0
    for p in module.parameters():
        p.grad = None
    return seconds


def run_preset(preset: str, repeats: int) -> dict:
    cfg = load_config(preset=preset)
    # the preset's ops with next to nothing to compute: 2 x 2 patches, width 96 (16-byte aligned bf16
    # rows for grouped_mm at every head and expert width), expert widths derived from it
    cfg.model.img_size, cfg.model.embed_dim = 2 * cfg.model.patch_size, 96
    cfg.moe.attn.expert_dim = cfg.moe.mlp.expert_dim = None
    batch = synthetic_batch(cfg.tasks.names, 1, cfg.model.img_size, torch.Generator().manual_seed(0))
    variants = {"dense": trainer_module(cfg, dense=True), "modsquad": trainer_module(cfg, dense=False),
                "modsquad+ckpt": trainer_module(cfg, dense=False, grad_checkpointing=True)}
    counts = {}
    for name, module in variants.items():
        step(module, batch)  # warm-up
        with OpCounter() as counter:
            step(module, batch)
        counts[name] = counter
    times = {name: [] for name in variants}
    for _ in range(repeats):  # round robin, so outside load hits every variant alike
        for name, module in variants.items():
            times[name].append(step(module, batch))
    ms = {name: (statistics.median(t) - counts[name].grouped_mm_seconds(repeats)) * 1e3 for name, t in times.items()}
    dense = counts["dense"].kinds["kernels"]
    return {name: {"host_ms": ms[name], "host_vs_dense": ms[name] / ms["dense"],
                   "kernels": c.kinds["kernels"], "views": c.kinds["views"],
                   "kernels_vs_dense": c.kinds["kernels"] / dense, "top_ops": c.ops.most_common(8)}
            for name, c in counts.items()}


@one_line_errors
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["small", "base"])
    parser.add_argument("--repeats", type=positive, default=7, help="timed steps per variant (median)")
    parser.add_argument("--threads", type=positive, default=1, help="torch threads (host work is single-threaded)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, host work (CPU, 2 x 2 patches, width 96), bf16 trainer model, grouped expert "
          f"kernel, forward + backward, median of {args.repeats}, {torch.get_num_threads()} thread(s)")
    results = {}
    for preset in args.presets:
        res = results[preset] = run_preset(preset, args.repeats)
        print(f"\n== {preset} ==\n"
              f"{'variant':<15}{'host ms':>9}{'vs dense':>10}{'kernels':>9}{'vs dense':>10}{'views':>7}  most issued ops")
        for name, r in res.items():
            top = ", ".join(f"{op} {n}" for op, n in r["top_ops"][:5])
            print(f"{name:<15}{r['host_ms']:>9.1f}{r['host_vs_dense']:>9.2f}x{r['kernels']:>9}"
                  f"{r['kernels_vs_dense']:>9.2f}x{r['views']:>7}  {top}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
