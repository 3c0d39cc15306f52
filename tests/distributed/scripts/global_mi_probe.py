"""Global MI over ranks vs one process on the concatenated batch, through a real DeepSpeed engine.

Every rank builds the same tiny per-task router, takes its slice of one global batch, fills a
tasks x experts probability table, sums it over ranks with a table reducer, and computes the MI
loss of the global table. The engine's backward averages gradients over ranks (ZeRO 0, fp32), so
the gradient it leaves is what DeepSpeed would step with. Each rank also computes the 1-process
reference on the whole batch and writes the comparison to OUT/rank{r}.json.

Usage: torchrun --nproc_per_node 2 tests/distributed/scripts/global_mi_probe.py OUT
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from modsquad_ds.distributed.bootstrap import init_distributed, seed_everything, shutdown
from modsquad_ds.distributed.collectives import all_reduce_sum_autograd
from modsquad_ds.distributed.ds_config import load_ds_config

TASKS, EXPERTS, DIM, TOKENS, GLOBAL_BATCH = 3, 5, 6, 4, 8


def mutual_information(table_TE: torch.Tensor) -> torch.Tensor:
    """I(T;E) of a table of summed routing probabilities (Mod-Squad: P = table / tokens)."""
    p = table_TE / table_TE.sum()
    p_t = p.sum(1, keepdim=True)
    p_e = p.sum(0, keepdim=True)
    return (p * torch.log(p / (p_t * p_e) + 1e-20)).sum()


class Routers(nn.Module):
    def __init__(self):
        super().__init__()
        self.task_wg = nn.Parameter(torch.randn(TASKS, DIM, EXPERTS))

    def table(self, x_BSD: torch.Tensor) -> torch.Tensor:
        probs_TNE = torch.softmax(torch.einsum("nd,tde->tne", x_BSD.reshape(-1, DIM), self.task_wg), -1)
        return probs_TNE.sum(1)  # [T, E]: each task's routing mass on each expert, this batch


def identity_backward_sum(t: torch.Tensor) -> torch.Tensor:
    """The tempting wrong version: global value forward, local gradient backward."""
    total = t.detach().clone()
    dist.all_reduce(total)
    return t + (total - t.detach())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    ctx = init_distributed(timeout_s=60, heartbeat_timeout_s=30)
    import deepspeed

    seed_everything(0)
    x_global = torch.randn(GLOBAL_BATCH, TOKENS, DIM)
    model = Routers()
    reference = Routers()
    reference.load_state_dict(model.state_dict())

    # 1-process reference on the concatenated batch.
    ref_loss = -mutual_information(reference.table(x_global))
    ref_loss.backward()
    ref_grad = reference.task_wg.grad.clone()

    local = GLOBAL_BATCH // ctx.world_size
    x_local = x_global[ctx.rank * local:(ctx.rank + 1) * local]
    config = load_ds_config("ds_configs/zero0_fp32.json", micro_batch=local)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                      config=config)

    results = {"rank": ctx.rank, "world_size": ctx.world_size, "ref_loss": ref_loss.item()}
    for name, reducer in (("autograd", all_reduce_sum_autograd), ("identity", identity_backward_sum)):
        engine.module.task_wg.grad = None
        loss = -mutual_information(reducer(engine.module.table(x_local)))
        engine.backward(loss)  # averages gradients over the data-parallel ranks
        grad = engine.module.task_wg.grad
        results[name] = {
            "loss": loss.item(),
            "max_abs_diff": (grad - ref_grad).abs().max().item(),
            "ratio_to_ref": (grad.flatten() @ ref_grad.flatten() / ref_grad.flatten().square().sum()).item(),
        }
    results["ref_grad_max"] = ref_grad.abs().max().item()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{ctx.rank}.json").write_text(json.dumps(results))
    shutdown(ctx)
    print(f"global_mi rank {ctx.rank}: {json.dumps(results)}", file=sys.stderr)


if __name__ == "__main__":
    from modsquad_ds.distributed.bootstrap import end_process

    main()
    end_process(0)  # as the trainer ends (gloo threads vs interpreter teardown)
