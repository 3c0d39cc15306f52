"""deepspeed.initialize and two optimizer steps with every given ds_configs JSON, on a tiny model with a
native DeepSpeed MoE layer whose experts are split over all ranks (ep_size = world size).

Per config it records: the loss, whether dense weights stayed identical on all ranks, the engine's
pre-clip global gradient norm and the global norm of the first step's update. With SGD at lr 1 the
update is the clipped gradient, so its norm must equal gradient_clipping when the raw norm is larger:
counting expert gradients too little or twice in the global norm breaks that equality (upstream
bugs: DeepSpeed PR #5259, issues #8469, #8475).

Usage: <launcher> tests/distributed/scripts/ds_config_probe.py OUT CONFIG.json [CONFIG.json ...]
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from modsquad_ds.distributed.bootstrap import init_distributed, seed_everything, shutdown
from modsquad_ds.distributed.ds_config import load_ds_config

DIM, EXPERTS_PER_RANK, MICRO, ACCUM, CLIP = 8, 2, 4, 2, 1.0


class Tiny(nn.Module):
    def __init__(self, ep_size: int):
        import deepspeed

        super().__init__()
        self.inp = nn.Linear(DIM, DIM)
        self.moe = deepspeed.moe.layer.MoE(hidden_size=DIM, expert=nn.Linear(DIM, DIM),
                                           num_experts=EXPERTS_PER_RANK * ep_size, ep_size=ep_size, k=1,
                                           capacity_factor=float(EXPERTS_PER_RANK * ep_size), min_capacity=0)
        self.out = nn.Linear(DIM, 1)

    def forward(self, x):
        h, _aux, _counts = self.moe(torch.relu(self.inp(x)))
        return self.out(h)


def flat(module: nn.Module, expert: bool) -> torch.Tensor:
    from deepspeed.moe.utils import is_moe_param

    return torch.cat([p.detach().float().flatten() for p in module.parameters() if is_moe_param(p) == expert])


def run(path: str, world: int) -> dict:
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    seed_everything(0)
    model = Tiny(world)
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "all"})
    config = load_ds_config(path, micro_batch=MICRO, grad_accum=ACCUM, grad_clip=CLIP)
    config["zero_allow_untested_optimizer"] = True  # SGD, so that the update reveals the clipped gradient
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(groups, lr=1.0), config=config)
    dtype = torch.bfloat16 if config.get("bf16", {}).get("enabled") else torch.float32
    rank = dist.get_rank()
    before = (flat(engine.module, False), flat(engine.module, True))
    losses, norms = [], []
    for step in range(2):
        for micro in range(ACCUM):
            g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
            x = torch.randn(MICRO, 3, DIM, generator=g).to(dtype)
            loss = 1000.0 * engine(x).float().square().mean()  # large: the raw norm exceeds CLIP
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        norm = engine.get_global_grad_norm()  # None where the optimizer wrapper does not report it
        norms.append(None if norm is None else float(norm))
        if step == 0:
            dense_step = before[0] - flat(engine.module, False)
            expert_step = before[1] - flat(engine.module, True)
    # Dense parameters are replicated everywhere: count rank 0's once. Each rank holds distinct
    # experts (expert-data-parallel size 1 here): sum their squares over ranks.
    sq = torch.tensor([expert_step.double().square().sum().item()], dtype=torch.float64)
    dist.all_reduce(sq)
    update_norm = (dense_step.double().square().sum() + sq).sqrt().item()
    dense_now = flat(engine.module, False)
    gathered = [torch.empty_like(dense_now) for _ in range(world)]
    dist.all_gather(gathered, dense_now)
    return {"config": path, "losses": losses, "grad_norms": norms, "update_norm": update_norm,
            "clip": CLIP, "dense_identical": all(torch.equal(gathered[0], g) for g in gathered),
            "experts_moved": bool(expert_step.abs().max() > 0), "bf16": dtype == torch.bfloat16,
            "zero_stage": config["zero_optimization"]["stage"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args()
    ctx = init_distributed(timeout_s=120, heartbeat_timeout_s=60)
    records = [run(path, ctx.world_size) for path in args.configs]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{ctx.rank}.json").write_text(json.dumps(records))
    shutdown(ctx)
    print(f"ds_config_probe rank {ctx.rank}: {len(records)} configs ok", file=sys.stderr)


if __name__ == "__main__":
    from modsquad_ds.distributed.bootstrap import end_process

    main()
    end_process(0)  # as the trainer ends (gloo threads vs interpreter teardown)
