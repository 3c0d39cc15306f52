"""One MoE layer, forward + backward, against its dense peer of equal active FLOPs, side by side.

MLP: ``MoEMlp`` (each expert kernel of moe/kernels.py; on the CPU also ``loop, general``, the loop
kernel with moe/cpu_mlp.py's one-pass path off, as GPUs and autocast run it), ``ExpertParallelMoEMlp``
at ep_size 1 (the trainer's layer: the local dropless dispatch, the ``auto`` kernel) and through
DeepSpeed's ``MOELayer`` (the path of ep_size > 1 without the all-to-all: its local experts batched
over the (E, C, D) buffer), DeepSpeed's stock dropless ``MoE`` (the same peer as
benchmarks/ep_throughput.py, built by its recipe), and the dense timm ``Mlp`` with hidden
``k * expert_hidden`` (the same active FLOPs per token). Attention: ``MoEAttention`` (MoA) against
timm's dense multi-head ``Attention`` with ``k`` heads of the expert width (the same query/output
FLOPs; MoA shares one K/V head, so it does slightly less).

Shapes: ``cpu`` is ViT-S (D 384, 16 experts top-4 of hidden 384, 4 tasks x 1,024 tokens, fp32);
``small`` and ``base`` are the presets' layers at 13 tasks x 8 images x 197 tokens (bf16 on CUDA).
Variants run round robin (outside load hits them alike); the table prints medians and
``dense_ms / variant_ms`` (throughput relative to dense: higher is better).

    python benchmarks/moe_layer.py                       # CPU: the cpu shape, fp32, 2 threads
    python benchmarks/moe_layer.py --shapes small base   # CUDA: bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn as nn
from timm.layers import Attention, Mlp

from _cli import one_line_errors, positive
from modsquad_ds.moe import MoEAttention, MoEMlp

try:
    from modsquad_ds.moe.kernels import has_grouped_mm, set_kernel
    KERNELS = ["loop"] + (["grouped"] if has_grouped_mm() else [])
except ImportError:  # a tree from before the kernel seam (PYTHONPATH=<old checkout>): its one path
    KERNELS = ["old"]

    def set_kernel(layer, kernel):
        return 0
try:
    from modsquad_ds.moe import cpu_mlp
except ImportError:  # a tree from before moe/cpu_mlp.py
    cpu_mlp = None

# name: (D, mlp experts, mlp top-k, expert hidden, attn experts, attn top-k, head dim, tasks, images, tokens)
SHAPES = {
    "cpu": (384, 16, 4, 384, 15, 6, 64, 4, 1, 1024),
    "small": (384, 16, 4, 384, 15, 6, 64, 13, 8, 197),
    "base": (768, 16, 4, 768, 24, 12, 128, 13, 8, 197),
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fb_moe(layer, x, task_ids):
    def run():
        y, stats = layer(x, task_ids)
        (y.float().square().mean() + 0 * stats.prob_table_TE.sum()).backward()
    return run


def _fb_dense(layer, x):
    def run():
        t, b, n, d = x.shape
        layer(x.reshape(t * b, n, d)).float().square().mean().backward()
    return run


def _fb_stock(layer, x):
    def run():
        y, l_aux, _ = layer(x.reshape(-1, x.shape[-1]))
        (y.float().square().mean() + 0 * l_aux).backward()
    return run


def _general_path(run):
    """``run`` with moe/cpu_mlp.py's one-pass CPU MoE MLP off: dispatch, the loop kernel one
    projection at a time, combine (the loop kernel as GPUs and autocast run it)."""
    def without_cpu_path():
        fusable, cpu_mlp.fusable = cpu_mlp.fusable, lambda expert, x: False
        try:
            run()
        finally:
            cpu_mlp.fusable = fusable
    return without_cpu_path


def _mlp_variants(d, e, k, h, x, task_ids, with_deepspeed: bool):
    torch.manual_seed(0)
    out = {"dense Mlp": _fb_dense(Mlp(d, k * h, act_layer=nn.GELU), x)}
    for kernel in KERNELS:
        layer = MoEMlp(d, h, e, k, num_tasks=x.shape[0])
        set_kernel(layer, kernel)
        out[f"MoEMlp {kernel}"] = _fb_moe(layer, x, task_ids)
    if x.device.type == "cpu" and cpu_mlp is not None:
        layer = MoEMlp(d, h, e, k, num_tasks=x.shape[0])
        set_kernel(layer, "loop")
        out["MoEMlp loop, general"] = _general_path(_fb_moe(layer, x, task_ids))
    if with_deepspeed:
        from deepspeed.moe.layer import MoE

        from modsquad_ds.moe.ds_adapter import ExpertParallelMoEMlp

        out["ExpertParallelMoEMlp ep1"] = _fb_moe(ExpertParallelMoEMlp(d, h, e, k, num_tasks=x.shape[0]), x, task_ids)
        via_moelayer = ExpertParallelMoEMlp(d, h, e, k, num_tasks=x.shape[0])
        via_moelayer.local_dispatch = False  # the path of ep_size > 1, without the all-to-all
        out["ExpertParallelMoEMlp MOELayer"] = _fb_moe(via_moelayer, x, task_ids)
        out["DeepSpeed MoE dropless"] = _fb_stock(
            MoE(d, Mlp(d, h, act_layer=nn.GELU), num_experts=e, k=k, drop_tokens=False, use_rts=False,
                top2_2nd_expert_sampling=False), x)
    return out


def _attn_variants(d, e, k, hd, x, task_ids):
    torch.manual_seed(0)
    out = {"dense Attention": _fb_dense(Attention(d, num_heads=k, attn_head_dim=hd, qkv_bias=True), x)}
    for kernel in KERNELS:
        layer = MoEAttention(d, hd, e, k, num_tasks=x.shape[0])
        set_kernel(layer, kernel)
        out[f"MoEAttention {kernel}"] = _fb_moe(layer, x, task_ids)
    return out


def measure(fns: dict, device, reps: int, warmup: int = 2, clock=time.perf_counter) -> dict[str, float]:
    modules = [m for fn in fns.values() for m in _modules_of(fn)]
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():  # round robin
            _sync(device)
            t0 = clock()
            fn()
            _sync(device)
            samples[name].append(clock() - t0)
        for m in modules:
            m.zero_grad(set_to_none=True)
    return {name: statistics.median(ts) * 1e3 for name, ts in samples.items()}


def _modules_of(fn):
    """The modules a variant's closure runs (through wrappers such as _general_path)."""
    modules = []
    for cell in fn.__closure__ or ():
        if isinstance(cell.cell_contents, nn.Module):
            modules.append(cell.cell_contents)
        elif callable(cell.cell_contents):
            modules += _modules_of(cell.cell_contents)
    return modules


def run(shape: str, device, dtype, reps: int, with_deepspeed: bool, mlp_only: bool = False,
        clock=time.perf_counter) -> dict:
    d, e, k, h, ea, ka, hd, t, b, n = SHAPES[shape]
    task_ids = torch.arange(t, device=device)
    results = {}
    for part, build, dense in (("mlp", lambda x: _mlp_variants(d, e, k, h, x, task_ids, with_deepspeed), "dense Mlp"),
                               ("attn", lambda x: _attn_variants(d, ea, ka, hd, x, task_ids), "dense Attention")):
        if mlp_only and part == "attn":
            continue
        x = torch.randn(t, b, n, d, device=device, dtype=dtype, requires_grad=True)
        fns = build(x)
        for fn in fns.values():
            for m in _modules_of(fn):
                m.to(device=device, dtype=dtype)
        ms = measure(fns, device, reps, clock=clock)
        results[part] = {name: {"ms": v, "vs_dense": ms[dense] / v} for name, v in ms.items()}
    return results


@one_line_errors
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=None,
                        help="default: cpu on CPU, small base on CUDA")
    parser.add_argument("--reps", type=positive, default=None, help="timed rounds (default 10 CPU, 30 CUDA)")
    parser.add_argument("--threads", type=positive, default=2, help="CPU threads")
    parser.add_argument("--no-deepspeed", action="store_true", help="leave out the DeepSpeed layers")
    parser.add_argument("--cpu-time", action="store_true",
                        help="CPU: time the process's CPU seconds, not wall time (a machine shared with other "
                             "jobs deschedules threads; CPU time counts only the work done)")
    parser.add_argument("--mlp-only", action="store_true", help="leave out the attention layers")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.set_num_threads(args.threads)
    shapes = args.shapes or (["small", "base"] if cuda else ["cpu"])
    reps = args.reps or (30 if cuda else 10)
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    clock_name = "process CPU time" if args.cpu_time and not cuda else "wall time"
    print(f"torch {torch.__version__}, {where}, {dtype}, forward + backward, median {clock_name} of {reps}")
    everything = {}
    for shape in shapes:
        d, e, k, h, ea, ka, hd, t, b, n = SHAPES[shape]
        clock = time.process_time if args.cpu_time and not cuda else time.perf_counter
        res = run(shape, device, dtype, reps, not args.no_deepspeed, args.mlp_only, clock)
        everything[shape] = res
        print(f"\n== {shape}: D {d}, {t * b * n:,} tokens; MLP {e} experts top-{k} of hidden {h} vs dense hidden "
              f"{k * h}; MoA {ea} experts top-{ka} of width {hd} vs {ka} dense heads ==")
        print(f"{'layer':<28} {'ms':>9} {'vs dense':>9}")
        for part in res.values():
            for name, r in part.items():
                print(f"{name:<28} {r['ms']:>9.2f} {r['vs_dense']:>8.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "dtype": str(dtype), "torch": torch.__version__, "shapes": everything}, f,
                      indent=1)


if __name__ == "__main__":
    main()
