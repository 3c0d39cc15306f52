"""Reshard then resume with the real commands: a run trained on 2 ranks at ep_size 2 (torchrun) continues
as one process at ep_size 1 after ``python -m modsquad_ds.reshard``, from the step, schedule and
weights where it stopped (the exactness of the transferred state is proven in test_export_checkpoints)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from _launch import BIN, mini_shards, python, run, run_ok
from modsquad_ds.export.reader import load_checkpoint_weights

pytestmark = [pytest.mark.dist, pytest.mark.timeout(400)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return mini_shards(tmp_path_factory.mktemp("reshard_mini"), points=2, views=3, seed=2, samples_per_shard=4)


def _metrics(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def test_reshard_to_one_process_then_resume_continues_the_run(shards, tmp_path):
    first, second = tmp_path / "two_ranks", tmp_path / "one_rank"
    args = ["-m", "modsquad_ds.train", "--config", "configs/demo.yaml", "--set", f"data.shards_dir={shards}",
            "--set", "data.batch_size=2", "--set", "data.workers=0", "--set", "train.steps=4",
            "--set", "train.warmup_steps=0", "--set", "train.log_every=1", "--set", "moe.router_noise=false",
            "--set", "train.ds_config=ds_configs/zero1_fp32.json"]
    run_ok([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", *args, "--set", f"train.out_dir={first}",
            "--set", "train.ep_size=2", "--set", "train.stop_after=2"], timeout_s=240)

    resharded = run_ok([python(), "-m", "modsquad_ds.reshard", "--run", str(first), "--world-size", "1",
                        "--ep-size", "1", "--out", str(second)], timeout_s=120)
    assert "resharded checkpoint" in resharded.output
    layout = json.loads((second / "checkpoints" / "step_00000002" / "layout.json").read_text())
    assert layout["world_size"] == 1 and layout["train.ep_size"] == 1 and layout["data.batch_size"] == 4

    # before it is resumed, the resharded checkpoint exports as its source does, and is not resharded again
    src, dst = load_checkpoint_weights(first), load_checkpoint_weights(second)
    assert dst.step == 2 and dst.source.endswith("resharded") and dst.world_size == 1
    assert src.model.keys() == dst.model.keys() and all(torch.equal(src.model[k], dst.model[k]) for k in src.model)
    assert all(torch.equal(src.objective[k], dst.objective[k]) for k in src.objective)
    run_ok([python(), "-m", "modsquad_ds.export", "--run", str(second), "--threshold", "1.0"], timeout_s=120)
    assert len(list((second / "export" / "step_00000002").glob("*.safetensors"))) == 13
    scores = []
    for run_dir in (first, second):  # the source's step 2 is its newest checkpoint too; one batching for both
        run_ok([python(), "-m", "modsquad_ds.evaluate", "--run", str(run_dir), "--split", "train",
                "--set", "data.batch_size=4"], timeout_s=180)
        scores.append(json.loads((run_dir / "eval" / "train_step_00000002.json").read_text())["tasks"])
    assert scores[0] == scores[1]
    again = run([python(), "-m", "modsquad_ds.reshard", "--run", str(second), "--world-size", "2",
                 "--out", str(tmp_path / "again")], timeout_s=120)
    assert again.returncode == 2 and "was itself written by python -m modsquad_ds.reshard" in again.output

    result = run_ok([python(), "-m", "modsquad_ds.train", "--config", str(second / "config.yaml")], timeout_s=240)
    assert "resumed from" in result.output and "step_00000002" in result.output
    before, after = _metrics(first), _metrics(second)
    assert sorted(before) == [1, 2] and sorted(after) == [3, 4]
    # the cosine schedule continues where it was (lr of step 3 follows step 2's, 4 steps in all)
    assert after[3]["lr"] < before[2]["lr"] and math.isclose(after[4]["lr"], 0.0, abs_tol=1e-3 * before[1]["lr"])
    assert all(math.isfinite(v) for row in after.values() for k, v in row.items() if k.startswith("loss/"))
    assert (second / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt").is_file()
