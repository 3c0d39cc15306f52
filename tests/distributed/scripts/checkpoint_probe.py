"""One rank of tests/distributed/test_checkpoint_files.py: the trainer's checkpoint.save and
load_latest around a real DeepSpeed engine (trainer.build_engine, tiny preset, ZeRO-1 fp32).

Saves steps 1..4 with keep_checkpoints 2 into a folder holding a crashed save's leftovers, records
the folder after each step, saves step 4 again (keep 0), then resumes with load_latest after
reseeding and records what came back. Writes OUT/rank0.json.

Usage: checkpoint_probe.py OUT   (RANK, WORLD_SIZE, MASTER_* set: 1 rank)
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

    from modsquad_ds.config import load_config
    from modsquad_ds.distributed.ds_config import ds_config_for_run
    from modsquad_ds.train import checkpoint, manifest
    from modsquad_ds.train.trainer import build_engine

    ds_logging.logger.setLevel("WARNING")
    cfg = load_config(preset="tiny", overrides=["tasks.names=[class_scene,depth_zbuffer]", f"train.out_dir={out}"])
    engine = build_engine(cfg, ds_config_for_run(cfg))
    root, layout = out / "checkpoints", {"world_size": 1, "data.batch_size": 2}
    (root / ".partial-step_00000009").mkdir(parents=True)  # a crash mid-save of an earlier run
    rec = {"after": []}
    for step in (1, 2, 3, 4):
        pos = checkpoint.TrainPosition(step=step, epoch=step // 3, batch_in_epoch=step % 3)
        path = checkpoint.save(engine, root, pos, {"usage": {"n": step}}, keep=2, layout=layout)
        rec["after"].append({"returned": path.name, "names": sorted(p.name for p in root.iterdir())})
    rec["latest"] = (root / "latest").read_text()
    rec["verify"] = [manifest.verify(f) for f in checkpoint.complete_checkpoints(root)]
    rec["converter_scripts"] = sorted(p.name for p in root.rglob("zero_to_*.py"))
    rec["layout"] = json.loads((root / "step_00000004" / "layout.json").read_text())
    torch.manual_seed(5)
    checkpoint.save(engine, root, checkpoint.TrainPosition(step=4, epoch=1, batch_in_epoch=1), {"usage": {"n": 40}},
                    keep=0, layout=layout)  # keep 0: keep everything; step 4 replaced
    rec["expected_rand"] = torch.rand(2).tolist()
    rec["after_resave"] = [p.name for p in checkpoint.complete_checkpoints(root)]
    torch.manual_seed(9)
    position, extra = checkpoint.load_latest(engine, root, layout)
    rec["position"], rec["extra"], rec["rand_after_load"] = vars(position), extra, torch.rand(2).tolist()
    (out / "rank0.json").write_text(json.dumps(rec))
    shutdown(ctx)


if __name__ == "__main__":
    from modsquad_ds.distributed.bootstrap import end_process

    main()
    end_process(0)  # as the trainer ends (gloo threads vs interpreter teardown)
