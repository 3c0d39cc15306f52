"""Expert parallelism on 2 CPU ranks, and our DeepSpeed MoE layer against DeepSpeed's stock one.

Part 1 (2 gloo processes, one thread each, DeepSpeed engine, ZeRO 0 fp32, AdamW): training-step
throughput of ep_size 1 (experts replicated, plain data parallelism) vs ep_size 2 (experts sharded,
two all-to-alls per MoE MLP layer), for the tiny preset and a wider model, side by side, with ep_size
1 through DeepSpeed's MOELayer as the peer that runs ep_size 2's compute path without its all-to-all
(VARIANTS); plus the time to the first step (process start -> first step done).

Part 2 (one process, one thread): one MoE MLP layer, forward + backward per token:
ExpertParallelMoEMlp (per-task routers, dropless) vs deepspeed.moe.layer.MoE with its TopKGate,
same experts (timm Mlp), same count, same k; stock both dropless (drop_tokens=False) and with its
default capacity factor 1.0 (drops tokens).

    .venv/bin/python benchmarks/ep_throughput.py            # about a minute on 2 idle cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_START = time.perf_counter()

MODELS = {
    # name: (overrides, per-rank batch, measured steps)
    "tiny": (["model.img_size=32", "model.patch_size=8", "model.embed_dim=64", "model.depth=4",
              "moe.mlp.num_experts=8", "moe.mlp.top_k=2"], 8, 12),
    "wide": (["model.img_size=64", "model.patch_size=8", "model.embed_dim=192", "model.depth=4",
              "model.num_heads=6", "moe.attn.num_experts=12", "moe.attn.top_k=6",
              "moe.mlp.num_experts=16", "moe.mlp.top_k=4"], 8, 5),
}
TASKS = ["class_scene", "edge_texture", "keypoints2d", "segment_unsup2d"]
VARIANTS = {"ep1": 1, "ep1_moelayer": 1, "ep2": 2}
"""ep1 runs the MoE MLP layers' local dropless dispatch; ep2 must go through DeepSpeed's MOELayer
(equal-capacity buffers for its all-to-all), and so does ep1_moelayer, on one rank's experts with
no all-to-all: ep2 against ep1_moelayer prices the communication alone, ep2 against ep1 all of it."""


def _worker(out: Path) -> None:
    import torch

    torch.set_num_threads(1)
    from modsquad_ds.distributed.bootstrap import engine_args, init_distributed

    ctx = init_distributed(timeout_s=300, heartbeat_timeout_s=0)
    import deepspeed
    import deepspeed.utils.logging as ds_logging
    import torch.distributed as dist

    ds_logging.logger.setLevel("WARNING")
    from modsquad_ds.config import load_config
    from modsquad_ds.data.synthetic import synthetic_batch
    from modsquad_ds.model.factory import build_model
    from modsquad_ds.model.objective import MultiTaskObjective
    from modsquad_ds.moe.ds_adapter import ExpertParallelMoEMlp, convert_to_expert_parallel, moe_param_groups

    class TrainModule(torch.nn.Module):
        def __init__(self, model, objective):
            super().__init__()
            self.model, self.objective = model, objective

        def forward(self, batch):
            return self.objective(self.model(batch["image"]), batch)[0]

    t_init = time.perf_counter() - T_START
    results = {}
    for name, (overrides, batch_size, steps) in MODELS.items():
        cfg = load_config(preset="tiny", overrides=[*overrides, f"tasks.names=[{','.join(TASKS)}]"])
        batch = synthetic_batch(TASKS, batch_size, cfg.model.img_size,
                                generator=torch.Generator().manual_seed(ctx.rank))
        engines = {}
        for label, ep_size in VARIANTS.items():
            dist.barrier()
            t0 = time.perf_counter()
            torch.manual_seed(0)
            module = TrainModule(build_model(cfg), MultiTaskObjective(cfg))
            convert_to_expert_parallel(module.model, ep_size)
            if label == "ep1_moelayer":  # the ep2 compute path (DeepSpeed's MOELayer), without the all-to-all
                for layer in module.model.modules():
                    if isinstance(layer, ExpertParallelMoEMlp):
                        layer.local_dispatch = False
            engine, *_ = deepspeed.initialize(
                args=engine_args(), model=module, optimizer=torch.optim.AdamW(moe_param_groups(module, 0.05), lr=1e-4),
                config={"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": 1,
                        "zero_optimization": {"stage": 0}, "steps_per_print": 10**9})
            engines[label] = (engine, time.perf_counter() - t0, [])
        # interleaved (ep1, ep1_moelayer, ep2, ep1, ...) so that load from other processes hits all alike
        for i in range(steps + 1):
            for label, (engine, _, times) in engines.items():
                dist.barrier()
                t1 = time.perf_counter()
                loss = engine(batch)
                engine.backward(loss)
                engine.step()
                times.append(time.perf_counter() - t1)
        for label, (engine, t_engine, times) in engines.items():
            results[f"{name}/{label}"] = {
                "engine_s": t_engine, "first_step_s": times[0], "step_s": statistics.median(times[1:]),
                "images_per_s": 2 * batch_size / statistics.median(times[1:]),
                "params_per_rank": sum(p.numel() for p in engine.module.parameters())}
        del engines
    results["init_s"] = t_init
    if ctx.rank == 0:
        (out / "rank0.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def _run_ranks(world: int = 2) -> dict:
    from modsquad_ds.distributed.env import free_port

    with tempfile.TemporaryDirectory() as tmp:
        port = free_port("127.0.0.1")
        procs = []
        for rank in range(world):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
            procs.append(subprocess.Popen([sys.executable, __file__, "--worker", tmp], env=env,
                                          stdout=subprocess.DEVNULL if rank else None, stderr=subprocess.STDOUT))
        codes = [p.wait(timeout=900) for p in procs]
        if any(codes):
            raise SystemExit(f"workers failed: exit codes {codes}")
        return json.loads((Path(tmp) / "rank0.json").read_text())


def _layer_bench(reps: int = 20) -> list[tuple]:
    import torch
    import torch.nn as nn
    from deepspeed.moe.layer import MoE
    from timm.layers import Mlp

    from modsquad_ds.moe.ds_adapter import ExpertParallelMoEMlp

    torch.set_num_threads(1)
    rows = []
    # (label, dim, hidden, experts, k, tasks, images per task slot, tokens per image)
    for label, d, h, e, k, t, b, n in [("tiny", 64, 256, 8, 2, 4, 8, 17),
                                       ("wide", 192, 768, 16, 4, 4, 8, 65)]:
        torch.manual_seed(0)
        ours = ExpertParallelMoEMlp(d, h, e, k, num_tasks=t, noisy=True)
        ours_quiet = ExpertParallelMoEMlp(d, h, e, k, num_tasks=t, noisy=False)
        stock_free = MoE(d, Mlp(d, h, act_layer=nn.GELU), num_experts=e, k=k, drop_tokens=False,
                         use_rts=False, top2_2nd_expert_sampling=False)
        stock_cf1 = MoE(d, Mlp(d, h, act_layer=nn.GELU), num_experts=e, k=k, capacity_factor=1.0,
                        top2_2nd_expert_sampling=False)
        x = torch.randn(t, b, n, d, requires_grad=True)
        task_ids = torch.arange(t)
        tokens = t * b * n

        def fb_ours(layer):
            def run():
                y, stats = layer(x, task_ids)
                (y.square().mean() + stats.prob_table_TE.sum() * 0).backward()
            return run

        def fb_stock(layer):
            def run():
                y, l_aux, _ = layer(x.view(-1, d))
                (y.square().mean() + 0 * l_aux).backward()
            return run

        fns = {"ours": fb_ours(ours), "ours_no_noise": fb_ours(ours_quiet),
               "stock_dropless": fb_stock(stock_free), "stock_cf1": fb_stock(stock_cf1)}
        for fn in fns.values():
            for _ in range(3):
                fn()
        samples = {name: [] for name in fns}
        for _ in range(reps):  # round robin, so that outside load hits every variant alike
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
        timings = {name: statistics.median(ts) for name, ts in samples.items()}
        rows.append((label, d, h, e, k, tokens, timings))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # one rank of Part 1 (internal)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker)
        from modsquad_ds.distributed.bootstrap import end_process

        end_process(0)  # gloo threads vs interpreter teardown (see end_process)
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    r = _run_ranks()
    print("\n== Part 1: training step on 2 CPU ranks (gloo, 1 thread each, ZeRO 0 fp32), "
          f"{len(TASKS)} tasks, per-rank batch {MODELS['tiny'][1]} ==")
    print(f"{'model':<6} {'ep1 step ms':>11} {'ep1 MOELayer':>12} {'ep2 step ms':>11} {'ep2/ep1 thru':>13} "
          f"{'ep2/ep1 MOELayer':>16} {'ep1 img/s':>9} {'ep2 img/s':>9} {'params/rank ep1':>15} {'ep2':>9} "
          f"{'engine s ep1/ep2':>17} {'1st step s ep1/ep2':>19}")
    for name in MODELS:
        a, m, b = r[f"{name}/ep1"], r[f"{name}/ep1_moelayer"], r[f"{name}/ep2"]
        print(f"{name:<6} {a['step_s'] * 1e3:>11.1f} {m['step_s'] * 1e3:>12.1f} {b['step_s'] * 1e3:>11.1f} "
              f"{a['step_s'] / b['step_s']:>12.2f}x {m['step_s'] / b['step_s']:>15.2f}x "
              f"{a['images_per_s']:>9.1f} {b['images_per_s']:>9.1f} "
              f"{a['params_per_rank']:>15,} {b['params_per_rank']:>9,} "
              f"{a['engine_s']:>8.2f}/{b['engine_s']:<8.2f} {a['first_step_s']:>9.2f}/{b['first_step_s']:<9.2f}")
    first = r["tiny/ep1"]
    print(f"time to first step (rank 0, tiny ep1): process start -> init_distributed done {r['init_s']:.1f} s, "
          f"+ engine {first['engine_s']:.1f} s + first step {first['first_step_s']:.2f} s "
          f"= {r['init_s'] + first['engine_s'] + first['first_step_s']:.1f} s")

    rows = _layer_bench()
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print("\n== Part 2: one MoE MLP layer, forward+backward, 1 process, 1 thread "
          "(ours: per-task routers, dropless) ==")
    print("us per token; ratios are time ours / time stock (lower is better for ours)")
    print(f"{'layer':<6} {'D':>4} {'hidden':>6} {'E':>3} {'k':>2} {'tokens':>6} {'ours':>7} {'ours no-noise':>13} "
          f"{'stock dropless':>14} {'stock cf=1.0':>12} {'ours/dropless':>13} {'no-noise/dropless':>17} {'ours/cf1':>8}")
    for label, d, h, e, k, tokens, t in rows:
        per = {n: v / tokens * 1e6 for n, v in t.items()}
        print(f"{label:<6} {d:>4} {h:>6} {e:>3} {k:>2} {tokens:>6} {per['ours']:>7.2f} {per['ours_no_noise']:>13.2f} "
              f"{per['stock_dropless']:>14.2f} {per['stock_cf1']:>12.2f} "
              f"{t['ours'] / t['stock_dropless']:>12.2f}x {t['ours_no_noise'] / t['stock_dropless']:>16.2f}x "
              f"{t['ours'] / t['stock_cf1']:>7.2f}x")


if __name__ == "__main__":
    main()
