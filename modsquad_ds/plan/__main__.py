"""Plan a cluster run before paying for it: memory per GPU, micro batch, all-to-all, throughput.

    python -m modsquad_ds.plan --preset base --gpus 240 --gpu-mem-gib 80 --global-batch 1440
    python -m modsquad_ds.plan --config run.yaml --gpus 64 --gpu-mem-gib 32 --global-batch 512 --dtype fp32
    python -m modsquad_ds.plan --preset tiny --gpus 1 --gpu-mem-gib 1 --global-batch 8 --calibrate

For every ep_size candidate (divisors of moe.mlp.num_experts that divide --gpus, or those given) it
prints one row: model state per GPU (weights, fp32 master partition, Adam moments, gradients),
activations per image, the largest micro batch that fits with its accumulation, the peak, the
all-to-all bytes per step and their time on --link-gbps, and images/s and GPU-hours when a step time
is given. Then it names the ep_size it would pick and why. docs/planning.md explains the model.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Optional

from modsquad_ds.finetune.source import zero_note, zero_stage
from modsquad_ds.plan import comm
from modsquad_ds.plan.memory import (ParamCounts, activation_bytes, activation_bytes_per_image, count_params,
                                     peak_bytes, state_bytes)

GIB = 2**30
PAPER_IMAGES = 3_790_000  # Taskonomy images the paper trains on (Sec. 4.1)


@dataclass
class Row:
    ep_size: int
    state_gib: dict
    act_per_image_gib: float
    micro_batch: int
    accumulation: int
    peak_gib: float
    alltoall_gib: float
    alltoall_s: float
    fits: bool


def plan_rows(cfg, params: ParamCounts, *, gpus: int, gpu_mem_gib: float, global_batch: int, ep_sizes,
              zero: int, dtype: str, link_gbps: float, capacity_factor: float, reserve_gib: float) -> list[Row]:
    if global_batch % gpus:
        raise SystemExit(f"error: --global-batch ({global_batch}) must be a multiple of --gpus ({gpus})")
    per_gpu = global_batch // gpus
    budget = (gpu_mem_gib - reserve_gib) * GIB
    rows = []
    for ep in ep_sizes:
        act = activation_bytes_per_image(cfg, dtype, capacity_factor, ep)
        st = state_bytes(params, world=gpus, ep_size=ep, zero=zero, dtype=dtype)

        def acts(m: int, ep=ep) -> float:
            return activation_bytes(cfg, m, dtype, capacity_factor, ep)

        fitting = [m for m in range(per_gpu, 0, -1) if per_gpu % m == 0 and peak_bytes(st, acts(m)) <= budget]
        micro = fitting[0] if fitting else 1
        accum = per_gpu // micro
        a2a = comm.alltoall(cfg, micro_batch=micro, accumulation=accum, ep_size=ep, dtype=dtype,
                            capacity_factor=capacity_factor)
        rows.append(Row(ep, {"weights": st.weights / GIB, "master": st.master / GIB, "adam": st.adam / GIB,
                             "grads": st.grads / GIB}, act / GIB, micro, accum,
                        peak_bytes(st, acts(micro)) / GIB, a2a.bytes_per_step / GIB,
                        comm.seconds(a2a.sent_per_step, link_gbps), bool(fitting)))
    return rows


def pick(rows: list[Row]) -> tuple[Row, str]:
    """Fewest micro steps (each costs a pass over the weights and launch overheads), then the least
    all-to-all time, then the smaller ep_size (fewer, larger expert GEMMs)."""
    fitting = [r for r in rows if r.fits]
    if not fitting:
        return None, "no ep_size fits even one image per GPU"
    best = min(fitting, key=lambda r: (r.accumulation, r.alltoall_s, r.ep_size))
    why = [f"ep_size {best.ep_size}: micro batch {best.micro_batch} x {best.accumulation} accumulation"]
    if best.ep_size == 1:
        why.append("the experts fit replicated, so no all-to-all is needed at all")
    else:
        why.append(f"{best.alltoall_s * 1e3:.0f} ms of all-to-all per step")
    fewer = [r for r in fitting if r.ep_size < best.ep_size]
    if fewer:
        why.append("smaller ep_size needs more accumulation steps "
                   f"({', '.join(f'ep {r.ep_size}: {r.accumulation}' for r in fewer)})")
    return best, "; ".join(why)


def format_table(rows: list[Row], step_time_s: Optional[float], global_batch: int, gpus: int,
                 images: int, epochs: float) -> str:
    head = ("| ep_size | weights | master | Adam | grads | act/image | micro x accum | peak | "
            "a2a/step | a2a time | fits |")
    lines = [head, "|" + "---:|" * 11]
    for r in rows:
        s = r.state_gib
        lines.append(f"| {r.ep_size} | {s['weights']:.2f} | {s['master']:.2f} | {s['adam']:.2f} | {s['grads']:.2f} | "
                     f"{r.act_per_image_gib:.2f} | {r.micro_batch} x {r.accumulation} | {r.peak_gib:.1f} | "
                     f"{r.alltoall_gib:.2f} | {r.alltoall_s * 1e3:.0f} ms | {'yes' if r.fits else 'NO'} |")
    lines.append("(GiB per GPU; a2a: bytes one GPU hands to all_to_all_single per optimizer step, time of the "
                 "part it sends)")
    if step_time_s:
        ips = global_batch / step_time_s
        hours = images * epochs / ips / 3600
        lines.append(f"step {step_time_s:.2f} s -> {ips:,.0f} images/s ({ips / gpus:.1f} per GPU); "
                     f"{epochs:g} epochs of {images:,} images: {hours:.1f} h, {hours * gpus:,.0f} GPU-hours")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m modsquad_ds.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Model: docs/planning.md. Checks: tests/unit/plan, "
                                       "tests/distributed/test_plan_checks.py.")
    p.add_argument("--preset", default=None, help="tiny, small or base (default: the config's, else tiny)")
    p.add_argument("--config", default=None, help="a run YAML (its model, moe and tasks are planned)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set moe.mlp.num_experts=32")
    p.add_argument("--gpus", type=int, required=True, help="total GPUs (the world size)")
    p.add_argument("--gpu-mem-gib", type=float, required=True, help="memory of one GPU in GiB")
    p.add_argument("--global-batch", type=int, required=True, help="images per optimizer step over all GPUs")
    p.add_argument("--ep-size", type=int, nargs="*", default=None,
                   help="ep_size candidates (default: every divisor of the MLP expert count that divides --gpus)")
    p.add_argument("--zero", type=int, choices=(0, 1, 2), default=1, help="ZeRO stage (default 1)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16", help="training dtype (default bf16)")
    p.add_argument("--link-gbps", type=float, default=200.0,
                   help="all-to-all bandwidth per GPU in Gbit/s (default 200: one HDR InfiniBand port per GPU)")
    p.add_argument("--capacity-factor", type=float, default=1.25,
                   help="busiest expert's load over the even share, E*C/(k*tokens) (default 1.25)")
    p.add_argument("--reserve-gib", type=float, default=2.0,
                   help="memory kept free for the CUDA context, NCCL and fragmentation (default 2)")
    p.add_argument("--step-time-s", type=float, default=None,
                   help="measured seconds per optimizer step; gives images/s and GPU-hours")
    p.add_argument("--images", type=int, default=PAPER_IMAGES,
                   help="training images per epoch (default: the paper's 3.79M)")
    p.add_argument("--epochs", type=float, default=100, help="epochs (default: the paper's 100)")
    p.add_argument("--calibrate", action="store_true",
                   help="also run two real training steps on this machine (its GPU when DS_ACCELERATOR is "
                        "cuda, else the CPU), one process, and print measured against predicted peak and "
                        "activations")
    p.add_argument("--calibrate-batch", type=int, default=1, metavar="N", help="micro batch of --calibrate (default 1)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from modsquad_ds.config import ConfigError, load_config

    try:
        cfg = load_config([args.config] if args.config else [], preset=args.preset, overrides=args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    limits = {"gpus": 1, "global_batch": 1, "calibrate_batch": 1, "capacity_factor": 1.0, "reserve_gib": 0.0}
    positive = ("gpu_mem_gib", "link_gbps", "step_time_s", "images", "epochs")
    for name, value in vars(args).items():
        if value is None or (name not in limits and name not in positive):
            continue
        if value < limits.get(name, 0) or (name in positive and value <= 0):
            must = f"be >= {limits[name]:g}" if name in limits else "be > 0"
            print(f"error: --{name.replace('_', '-')} must {must}, got {value:g}", file=sys.stderr)
            return 2
    experts = cfg.moe.mlp.num_experts
    ep_sizes = args.ep_size or [e for e in range(1, experts + 1) if experts % e == 0 and args.gpus % e == 0]
    for ep in ep_sizes:
        if ep < 1:
            print(f"error: --ep-size must be >= 1, got {ep}", file=sys.stderr)
            return 2
        if experts % ep or args.gpus % ep:
            print(f"error: --ep-size {ep} must divide moe.mlp.num_experts ({experts}) and --gpus ({args.gpus})",
                  file=sys.stderr)
            return 2
    zero = zero_stage(cfg, args.zero)  # fine-tuning modes routers and heads train at ZeRO 0
    params = count_params(cfg)
    if zero == 0 and args.dtype == "bf16" and params.frozen_experts < params.mlp_experts:  # experts train
        print("error: bf16 needs ZeRO 1 or 2 (ds_configs has no zero0_bf16: see docs/launchers.md)", file=sys.stderr)
        return 2
    trains = (f"; {params.trainable / 1e6:.2f}M train (finetune.mode {cfg.finetune.mode})"
              if params.trainable < params.total else "")
    print(f"{cfg.preset}: {params.total / 1e6:.1f}M parameters ({params.mlp_experts / 1e6:.1f}M in MLP experts, "
          f"sharded by ep_size{trains}), {len(cfg.tasks.names)} tasks, {args.gpus} GPUs x {args.gpu_mem_gib:g} GiB, "
          f"global batch {args.global_batch}, ZeRO {zero}, {args.dtype}, link {args.link_gbps:g} Gbit/s")
    if zero_note(cfg, args.zero):
        print(zero_note(cfg, args.zero))
    rows = plan_rows(cfg, params, gpus=args.gpus, gpu_mem_gib=args.gpu_mem_gib, global_batch=args.global_batch,
                     ep_sizes=ep_sizes, zero=zero, dtype=args.dtype, link_gbps=args.link_gbps,
                     capacity_factor=args.capacity_factor, reserve_gib=args.reserve_gib)
    print(format_table(rows, args.step_time_s, args.global_batch, args.gpus, args.images, args.epochs))
    best, why = pick(rows)
    if best is None:
        why += ": use more or larger GPUs" + "".join(
            f", {fix}" for fix, applies in (("bf16", args.dtype != "bf16"), ("ZeRO 2", zero != 2 and zero_stage(cfg, 2) == 2),
                                            ("model.grad_checkpointing=true", not cfg.model.grad_checkpointing))
            if applies)
    print(f"pick: {why}")
    if args.calibrate:
        _calibrate(cfg, args)
    return 0 if best is not None else 1


def _calibrate(cfg, args) -> None:
    from modsquad_ds.distributed.bootstrap import init_distributed
    from modsquad_ds.plan.measure import measure_step

    init_distributed(heartbeat_timeout_s=0)
    params = count_params(cfg)
    zero = zero_stage(cfg, args.zero)
    st = state_bytes(params, world=1, ep_size=1, zero=zero, dtype=args.dtype)
    b = args.calibrate_batch
    m = measure_step(cfg, b, zero, args.dtype)
    act = activation_bytes(cfg, b, args.dtype, device=m.device)  # predicted for where it was measured
    predicted = peak_bytes(st, act)
    print(f"calibration (1 process, micro batch {b}, ZeRO {zero}, {args.dtype}): "
          f"peak predicted {predicted / 2**20:.1f} MiB, measured "
          f"{m.peak_bytes / 2**20:.1f} MiB ({predicted / m.peak_bytes:.3f}x); activations predicted "
          f"{act / 2**20:.1f} MiB, measured {m.saved_activation_bytes / 2**20:.1f} MiB"
          + (" (finetune.mode heads: the backbone saves nothing; the prediction adds the forward's working "
             "set in its largest layer, which the peak holds)" if cfg.finetune.mode == "heads" else
             " (with grad checkpointing the forward keeps only the blocks' inputs; the block backward "
             "recomputes counts in the prediction and the peak)" if cfg.model.grad_checkpointing else ""))


if __name__ == "__main__":
    from modsquad_ds.distributed.bootstrap import run_command

    run_command(main)  # not sys.exit: see end_process (gloo threads vs interpreter teardown)
