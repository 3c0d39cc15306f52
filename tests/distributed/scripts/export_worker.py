"""One rank of the export tests (tests/distributed/test_export_checkpoints.py).

Usage: export_worker.py OUT CASE [CASE ...]   CASE = zero{S}_{fp32|bf16}; RANK etc. set (2 ranks).

For each case: the trainer's own engine (trainer.build_engine: real DeepSpeed, the run's MoE parameter
groups) trains 2 steps at ep_size 2 on a synthetic batch and saves with the trainer's checkpoint.save
(config.yaml and usage.json beside, as the trainer writes them); rank 0 reshards that run to ep_size 1
(python -m modsquad_ds.reshard's function), and an ep_size 1 engine resumes from it through the
trainer's checkpoint.load_latest and saves natively. After each save every rank writes the engine's
true fp32 weights as it holds them (``safe_get_full_fp32_param`` for ZeRO 1/2; at ZeRO 0 the
module's parameters, or in a bf16 run their fp32 masters; experts under their global id) to
reference_rank{r}.pt. The test reads the checkpoints with the export reader and compares.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

T0 = time.perf_counter()
torch.set_num_threads(1)
TASKS = ["class_scene", "depth_zbuffer", "edge_texture"]


def config(case: str, ep_size: int, run: Path):
    from modsquad_ds.config import load_config

    zero, precision = case.split("_")
    # bf16 without ZeRO is refused with clipping (ds_config.validate), as a router fine-tuning
    # (ZeRO 0 always) clips nothing of the experts, which are frozen there
    clip = ["train.grad_clip=0"] if case == "zero0_bf16" else []
    return load_config(preset="tiny", overrides=[*clip,
        f"tasks.names=[{','.join(TASKS)}]", f"train.zero_stage={zero[4:]}", f"train.precision={precision}",
        f"train.ep_size={ep_size}", "data.batch_size=2", "train.lr=0.01", "train.warmup_steps=0", "train.steps=2",
        f"train.out_dir={run}", "train.ds_config=ds_configs/zero1_fp32.json"])


def layout(cfg, world: int) -> dict:
    return {"world_size": world, "train.ep_size": cfg.train.ep_size, "data.batch_size": cfg.data.batch_size,
            "data.workers": cfg.data.workers, "tasks.names": list(cfg.tasks.names),
            "model.embed_dim": cfg.model.embed_dim, "model.depth": cfg.model.depth}


def write_reference(engine, zero: int, path: Path) -> None:
    """The engine's fp32 weights as this rank holds them, experts under their global ids."""
    from deepspeed.utils import safe_get_full_fp32_param

    from modsquad_ds.moe.ds_adapter import expert_parallel_layers

    local_to_global = {}
    for prefix, layer in expert_parallel_layers(engine.module):
        for local, global_id in enumerate(layer.global_expert_ids()):
            local_to_global[f"{prefix}.deepspeed_moe.experts.deepspeed_experts.{local}."] = \
                f"{prefix}.deepspeed_moe.experts.deepspeed_experts.{global_id}."
    # bf16 at ZeRO 0: DeepSpeed's FP16_UnfusedOptimizer keeps a whole fp32 master per parameter
    masters = {id(lp): hp for lps, hps in zip(getattr(engine.optimizer, "fp16_groups", ()),
                                              getattr(engine.optimizer, "fp32_groups", ())) for lp, hp in zip(lps, hps)}
    reference = {}
    for name, p in engine.module.named_parameters():  # same order on every rank: the gathers match
        full = safe_get_full_fp32_param(p) if zero > 0 else masters.get(id(p), p).detach().float()
        for local, global_name in local_to_global.items():
            if name.startswith(local):
                name = global_name + name[len(local):]
        reference[name] = full.detach().clone().float()
    torch.save(reference, path)


def run_case(case: str, out: Path, rank: int, world: int) -> dict:
    """ep_size 2: train 2 steps and save (OUT/CASE/ep2); then reshard that run to ep_size 1 on the same
    ranks (OUT/CASE/ep1), resume an ep_size 1 engine from it through the trainer's checkpoint.load_latest
    and save again: the same weights, natively saved at ep_size 1."""
    import torch.distributed as dist

    from modsquad_ds.config import save_config
    from modsquad_ds.data.synthetic import synthetic_batch
    from modsquad_ds.distributed.ds_config import ds_config_for_run
    from modsquad_ds.export.reshard import reshard
    from modsquad_ds.train import checkpoint
    from modsquad_ds.train.trainer import build_engine
    from modsquad_ds.train.usage import UsageAccumulator, write_usage

    zero = int(case.split("_")[0][4:])
    run = out / case / "ep2"
    cfg = config(case, 2, run)
    engine = build_engine(cfg, ds_config_for_run(cfg))
    usage = UsageAccumulator(cfg.tasks.names)
    for step in range(2):
        batch = synthetic_batch(TASKS, 2, cfg.model.img_size, torch.Generator().manual_seed(100 * step + rank))
        loss, _, routing = engine(batch)
        engine.backward(loss)
        engine.step()
        usage.add(routing)
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run / "config.yaml")
    checkpoint.save(engine, run / "checkpoints", checkpoint.TrainPosition(step=2, batch_in_epoch=2),
                    {"usage": usage.state_dict()}, keep=1, layout=layout(cfg, world))
    tables = usage.global_tables()
    if rank == 0:
        write_usage(run / "usage.json", cfg.tasks.names, tables)
    write_reference(engine, zero, run / f"reference_rank{rank}.pt")

    resharded = out / case / "ep1"
    if rank == 0:
        reshard(run, resharded, world_size=world, ep_size=1)
    dist.barrier()
    cfg1 = config(case, 1, resharded)
    engine1 = build_engine(cfg1, ds_config_for_run(cfg1))
    position, extra = checkpoint.load_latest(engine1, resharded / "checkpoints", layout(cfg1, world))
    dist.barrier()  # the save below replaces the step folder the other rank may still be loading from
    checkpoint.save(engine1, resharded / "checkpoints", position, extra, keep=1, layout=layout(cfg1, world))
    write_reference(engine1, zero, resharded / f"reference_rank{rank}.pt")
    dist.barrier()
    return {"case": case, "module_dtype": str(next(engine.module.parameters()).dtype),
            "resumed_position": vars(position), "resumed_usage_layers": sorted(extra.get("usage", {}))}


def main() -> None:
    out, cases = Path(sys.argv[1]), sys.argv[2:]
    from modsquad_ds.distributed.bootstrap import init_distributed

    ctx = init_distributed(timeout_s=120, heartbeat_timeout_s=0)
    import deepspeed.utils.logging as ds_logging

    ds_logging.logger.setLevel("WARNING")
    records = [run_case(case, out, ctx.rank, ctx.world_size) for case in cases]
    (out / f"rank{ctx.rank}.json").write_text(json.dumps({"cases": records, "total_s": time.perf_counter() - T0}))
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    from modsquad_ds.distributed.bootstrap import end_process

    main()
    end_process(0)  # as the trainer ends (gloo threads vs interpreter teardown)
