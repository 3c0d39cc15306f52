"""One rank of tests/distributed/test_global_mi.py's trainer check: the trainer's own engine
(trainer.build_engine, ep_size 2, tiny preset) makes its MI global.

Each rank runs one forward on its own synthetic batch and writes the MI per MoE layer that the engine
reports (``mi/<layer>``) beside two references computed here from the layer tables the forward
returned: the MI of the tables summed over both ranks (what the objective must use) and the MI of this
rank's table alone (what an engine without the cross-rank reduction would report).

Usage: trainer_mi_probe.py OUT   (RANK, WORLD_SIZE, MASTER_* set: 2 ranks)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)


def main() -> None:
    out = Path(sys.argv[1])
    from modsquad_ds.distributed.bootstrap import init_distributed, shutdown

    ctx = init_distributed(timeout_s=120, heartbeat_timeout_s=0)
    import deepspeed.utils.logging as ds_logging
    import torch.distributed as dist

    from modsquad_ds.config import load_config
    from modsquad_ds.data.synthetic import synthetic_batch
    from modsquad_ds.distributed.ds_config import ds_config_for_run
    from modsquad_ds.moe.losses import mutual_information
    from modsquad_ds.train.trainer import build_engine

    ds_logging.logger.setLevel("WARNING")
    tasks = ["class_scene", "depth_zbuffer", "edge_texture"]
    cfg = load_config(preset="tiny", overrides=[f"tasks.names=[{','.join(tasks)}]", "train.ep_size=2",
                                                "data.batch_size=2", f"train.out_dir={out / 'run'}"])
    engine = build_engine(cfg, ds_config_for_run(cfg))
    batch = synthetic_batch(tasks, 2, cfg.model.img_size, torch.Generator().manual_seed(7 + ctx.rank))
    _, stats, routing = engine(batch)
    use_gates = cfg.loss.mi_table == "topk_gates"
    record = {"logged": {}, "global": {}, "local": {}}
    for r in routing:
        local = (r.gate_table_TE if use_gates else r.prob_table_TE).detach().double()
        summed = local.clone()
        dist.all_reduce(summed)
        record["logged"][r.layer] = float(stats[f"mi/{r.layer}"])
        record["global"][r.layer] = float(mutual_information(summed))
        record["local"][r.layer] = float(mutual_information(local))
    (out / f"rank{ctx.rank}.json").write_text(json.dumps(record))
    shutdown(ctx)  # the trainer's own clean end (barriers around the teardown)


if __name__ == "__main__":
    from modsquad_ds.distributed.bootstrap import end_process

    main()
    end_process(0)  # as the trainer ends (gloo threads vs interpreter teardown)
