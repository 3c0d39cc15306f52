"""One rank of the planner's checks (tests/distributed/test_plan_checks.py).

Usage: plan_probe.py OUT memory|alltoall   with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set.

- memory (one process): the trainer's engine (build_engine) for tiny and small at ZeRO 1/2,
  fp32/bf16, and fine-tuning in modes routers and heads, two steps under the profiler (modsquad_ds.plan.measure): the measured peak, bytes held
  between steps and saved activations, and the capacity of every MoE MLP call (the busiest
  expert's tokens).
- alltoall (2 ranks, ep_size 2): one training step with every torch.distributed.all_to_all_single
  call counted (the call DeepSpeed's _AllToAll makes) and the capacities the gate returned.
Writes OUT/rank{r}.json; the test compares with the planner.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

torch.set_num_threads(1)

CASES = [  # preset, micro batch, ZeRO, dtype, overrides
    ("tiny", 8, 1, "fp32", []),
    ("tiny", 8, 1, "bf16", []),
    ("tiny", 8, 2, "bf16", []),
    ("small", 1, 1, "fp32", ["tasks.names=[class_scene,normal,depth_euclidean]"]),
    ("tiny", 64, 1, "fp32", ["model.grad_checkpointing=true"]),  # activations set the peak: 310 vs 480 MiB without
    # fine-tuning new tasks (no source run needed: measure builds the model without its weights); ZeRO 1
    # asked, 0 run (finetune.source.zero_stage)
    ("tiny", 8, 1, "fp32", ["finetune.mode=routers", "finetune.init_from=runs/source"]),
    ("tiny", 8, 1, "bf16", ["finetune.mode=routers", "finetune.init_from=runs/source"]),
    ("small", 2, 1, "fp32", ["tasks.names=[class_scene,normal,depth_euclidean]", "finetune.mode=heads",
                             "finetune.init_from=runs/source"]),
]


class Counter:
    """Counts all_to_all_single inputs and the capacities TaskGate returns while ``on``."""

    def __init__(self):
        from modsquad_ds.moe.ds_adapter import TaskGate

        self.on, self.bytes, self.calls, self.capacities = False, 0, 0, []
        original_a2a, original_gate = dist.all_to_all_single, TaskGate.forward

        def a2a(output, input, *args, **kwargs):
            if self.on:
                self.bytes += input.numel() * input.element_size()
                self.calls += 1
            return original_a2a(output, input, *args, **kwargs)

        def gate(module, *args, **kwargs):
            out = original_gate(module, *args, **kwargs)
            if self.on:
                self.capacities.append(int(out[1]))
            return out

        dist.all_to_all_single = a2a  # DeepSpeed's TorchBackend looks it up on the module at each call
        TaskGate.forward = gate


def config(preset, overrides, ep_size):
    from modsquad_ds.config import load_config

    return load_config(preset=preset, overrides=[f"train.ep_size={ep_size}", "loss.w_mi=0.05", *overrides])


def main() -> None:
    out_dir, check = Path(sys.argv[1]), sys.argv[2]
    from modsquad_ds.distributed.bootstrap import init_distributed
    from modsquad_ds.data.synthetic import synthetic_batch
    from modsquad_ds.plan.measure import _engine, measure_step

    ctx = init_distributed(timeout_s=120, heartbeat_timeout_s=0)
    counter = Counter()
    record = {"memory": [], "alltoall": []}
    for preset, micro, zero, dtype, overrides in CASES:
        cfg = config(preset, overrides, ctx.world_size)
        if check == "memory":
            counter.capacities, counter.on = [], True
            m = measure_step(cfg, micro, zero, dtype)
            counter.on = False
            record["memory"].append({"preset": preset, "micro": micro, "zero": zero, "dtype": dtype,
                                     "overrides": overrides, "peak": m.peak_bytes, "between": m.before_step_bytes,
                                     "activations": m.saved_activation_bytes, "capacities": counter.capacities})
        elif preset == "tiny" and not cfg.model.grad_checkpointing and not cfg.finetune.enabled:
            # one counted step: forward and backward all-to-alls of every MoE MLP layer (checkpointing
            # would add the recomputed forward's)
            engine = _engine(cfg, zero, dtype, micro)
            batch = synthetic_batch(cfg.tasks.names, micro, cfg.model.img_size,
                                    generator=torch.Generator().manual_seed(ctx.rank))
            counter.bytes, counter.calls, counter.capacities, counter.on = 0, 0, [], True
            loss, *_ = engine(batch)
            engine.backward(loss)
            engine.step()
            counter.on = False
            record["alltoall"].append({"preset": preset, "micro": micro, "dtype": dtype, "bytes": counter.bytes,
                                       "calls": counter.calls, "capacities": counter.capacities})
    (out_dir / f"rank{ctx.rank}.json").write_text(json.dumps(record, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    from modsquad_ds.distributed.bootstrap import end_process

    main()
    end_process(0)  # as the trainer ends (gloo threads vs interpreter teardown)
