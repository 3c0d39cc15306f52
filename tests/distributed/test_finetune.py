"""Router fine-tuning under the real training command: a source run trained on some tasks, then
new tasks learned on its frozen backbone, on 2 ranks with experts sharded (ep_size 2), saved,
resumed; frozen weights compared bit for bit with the source checkpoint, optimizer states read
back from DeepSpeed's files. In bf16 (the GPU default): resumed exactly, read back, resharded onto 2 ranks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from _launch import BIN, mini_shards, python, run, run_ok
from modsquad_ds.distributed.env import free_port
from modsquad_ds.eval.runner import evaluate_model
from modsquad_ds.export.reader import SOURCE_MASTER, load_checkpoint_weights
from modsquad_ds.finetune import is_task_specific
from modsquad_ds.model.vit import ModSquadViT

pytestmark = pytest.mark.dist

SOURCE_TASKS = "[depth_euclidean,normal,edge_texture]"
NEW_TASKS = "[class_scene,keypoints2d]"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, Path]:
    """Shards of 18 training views and a 2-step source run on three tasks (one process)."""
    root = tmp_path_factory.mktemp("finetune")
    shards = mini_shards(root, points=3, views=3, seed=2, samples_per_shard=5)
    run_ok([python(), "-m", "modsquad_ds.train", "--config", "configs/demo.yaml", "--set", f"data.shards_dir={shards}",
            "--set", "data.batch_size=4", "--set", "data.workers=0", "--set", f"tasks.names={SOURCE_TASKS}",
            "--set", "train.steps=2", "--set", "train.warmup_steps=0", "--set", f"train.out_dir={root / 'src'}"],
           timeout_s=240)
    return shards, root / "src"


def _finetune(src: Path, out: Path, *extra: str) -> list[str]:
    args = ["-m", "modsquad_ds.train", "--config", str(src / "config.yaml"), "--set", f"train.out_dir={out}",
            "--set", f"finetune.init_from={src}", "--set", f"tasks.names={NEW_TASKS}", "--set", "data.batch_size=2",
            "--set", "train.log_every=1", "--set", "train.warmup_steps=0", "--set", "train.lr=1e-2"]
    for item in extra:
        args += ["--set", item]
    return args


def _optimizer_numel(folder: Path, rank: int) -> tuple[int, int]:
    """(tensors with state, elements of exp_avg) in a rank's ZeRO-0 optimizer file."""
    state = torch.load(folder / f"expp_rank_{rank}_mp_rank_00_optim_states.pt", weights_only=True)["optimizer"]["state"]
    return len(state), sum(s["exp_avg"].numel() for s in state.values())


def test_router_finetune_on_two_ranks_keeps_the_backbone_bit_identical_through_resume(source, tmp_path):
    shards, src = source
    out = tmp_path / "ft"
    launcher = [str(BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={free_port()}"]
    extra = ["finetune.mode=routers", "finetune.init_tasks={keypoints2d: edge_texture}", "data.fraction=0.5",
             "train.ep_size=2", "data.workers=0", "train.steps=4", "train.keep_checkpoints=3"]
    first = run_ok(launcher + _finetune(src, out, *extra, "train.stop_after=2"), timeout_s=240)
    assert "ZeRO stage 1 -> 0" in first.output and "parameters train" in first.output
    second = run_ok(launcher[:2] + [f"--master_port={free_port()}"] + _finetune(src, out, *extra), timeout_s=240)
    assert "resumed from" in second.output and "step_00000002" in second.output

    base = load_checkpoint_weights(src)
    mid, end = load_checkpoint_weights(out, step=2), load_checkpoint_weights(out, step=4)
    shared = [k for k in end.model if not is_task_specific(k)]
    # embeddings + final norm 6, block norms 16, 2 x (MoA 4 + dense MLP 4), 2 x (attention 4 + 8 experts x 4)
    assert len(shared) == 110
    for k in shared:  # bit-identical, after 2 steps and after save + resume + 2 more
        assert torch.equal(mid.model[k], base.model[k]) and torch.equal(end.model[k], base.model[k]), k
    trained = [k for k in end.model if is_task_specific(k)]
    assert all(not torch.equal(mid.model[k], end.model[k]) for k in trained), "routers, embedding, heads learn"

    # The optimizer holds state for exactly the trainable tensors, on both ranks (ZeRO 0: whole copies).
    expected = (len(trained) + len(end.objective),
                sum(end.model[k].numel() for k in trained) + sum(v.numel() for v in end.objective.values()))
    for rank in (0, 1):
        assert _optimizer_numel(end.folder, rank) == expected


def _losses(out: Path) -> dict[int, float]:
    rows = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss/total"] for r in rows if "loss/total" in r}


def test_bf16_router_finetune_resumes_exactly_keeps_its_fp32_masters_and_moves_to_two_ranks(source, tmp_path):
    """zero1_bf16 runs at ZeRO 0 here, where DeepSpeed keeps the fp32 masters of what trains in its
    FP16_UnfusedOptimizer's file (export/zero0.py). Stopped at step 2 and resumed, it equals the
    uninterrupted run; resharded from step 2 (frozen weights have no optimizer state) onto 2 ranks
    at ep_size 2, it trains on there."""
    shards, src = source
    whole, out, moved = tmp_path / "bf16_whole", tmp_path / "bf16", tmp_path / "bf16_two_ranks"
    extra = ("finetune.mode=routers", "data.workers=0", "train.steps=4", "train.ep_size=1",
             "train.ds_config=ds_configs/zero1_bf16.json", "train.keep_checkpoints=2")
    run_ok([python()] + _finetune(src, whole, *extra), timeout_s=240)
    run_ok([python()] + _finetune(src, out, *extra, "train.stop_after=2"), timeout_s=240)
    base, mid = load_checkpoint_weights(src), load_checkpoint_weights(out)
    assert mid.precision == "bf16" and mid.zero_stage == 0 and mid.step == 2 and mid.usage
    assert mid.source == f"{SOURCE_MASTER} (110 tensors not in the optimizer, e.g. frozen, from the module weights)"
    shared = [k for k in mid.model if not is_task_specific(k)]
    trained = [k for k in mid.model if is_task_specific(k)]
    # frozen: the source's fp32 weights as the bf16 module holds them; trained: bits bf16 cannot hold
    assert all(torch.equal(mid.model[k], base.model[k].bfloat16().float()) for k in shared)
    assert all(not torch.equal(mid.model[k], mid.model[k].bfloat16().float()) for k in trained)

    resumed = run_ok([python()] + _finetune(src, out, *extra), timeout_s=240)
    assert "resumed from" in resumed.output
    assert _losses(out) == _losses(whole) and sorted(_losses(whole)) == [1, 2, 3, 4]
    a, b = load_checkpoint_weights(whole), load_checkpoint_weights(out)
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)

    run_ok([python(), "-m", "modsquad_ds.reshard", "--run", str(out), "--checkpoint", "2", "--out", str(moved),
            "--world-size", "2", "--ep-size", "2"], timeout_s=120)
    second = run_ok([str(BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={free_port()}", "-m",
                     "modsquad_ds.train", "--config", str(moved / "config.yaml")], timeout_s=240)
    assert "resumed from" in second.output and "step_00000002" in second.output
    end = load_checkpoint_weights(moved)
    assert end.step == 4 and end.world_size == 2 and end.config.train.ep_size == 2 and end.source == mid.source
    assert all(torch.equal(end.model[k], mid.model[k]) for k in shared)
    assert all(not torch.equal(end.model[k], mid.model[k]) for k in trained)


def test_a_fine_tuned_run_evaluates_after_its_source_is_gone(source, tmp_path):
    """python -m modsquad_ds.evaluate on a router fine-tuning (zero1_fp32 asked, run at ZeRO 0): its
    checkpoint holds every weight, so evaluation builds the plain model of the new tasks, needs no
    source run, and gives what those weights give evaluated in this process."""
    shards, src = source
    moved_source, out = tmp_path / "source_copy", tmp_path / "ft"
    shutil.copytree(src, moved_source)
    run_ok([python()] + _finetune(moved_source, out, "finetune.mode=routers", "data.workers=0", "train.steps=2",
                                  "train.ep_size=1", "train.ds_config=ds_configs/zero1_fp32.json"), timeout_s=240)
    shutil.rmtree(moved_source)
    run_ok([python(), "-m", "modsquad_ds.evaluate", "--run", str(out), "--split", "train"], timeout_s=120)
    saved = json.loads((out / "eval" / "train_step_00000002.json").read_text())

    weights = load_checkpoint_weights(out)
    model = ModSquadViT(weights.config.model, weights.config.moe, weights.config.tasks.names)
    model.load_state_dict(weights.model)
    expected = evaluate_model(model, weights.config, "train")
    assert saved["tasks"].keys() == expected.metrics.keys() == {"class_scene", "keypoints2d"}
    assert saved["samples"] == expected.samples > 0
    for task, metrics in expected.metrics.items():
        for key, value in metrics.items():
            assert saved["tasks"][task][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (task, key)


def test_full_finetune_trains_everything_at_zero_1(source, tmp_path):
    shards, src = source
    out = tmp_path / "full"
    result = run_ok([python()] + _finetune(src, out, "finetune.mode=all", "data.workers=0", "train.steps=1",
                                           "train.ds_config=ds_configs/zero1_fp32.json"), timeout_s=240)
    assert "ZeRO stage" not in result.output
    base, end = load_checkpoint_weights(src), load_checkpoint_weights(out)
    assert end.zero_stage == 1
    changed = [k for k in end.model if not is_task_specific(k) and not torch.equal(base.model[k], end.model[k])]
    assert "blocks.1.mlp.experts.experts.0.fc1.weight" in changed and "patch_embed.proj.weight" in changed


def test_bad_source_is_refused_before_any_process_group(source, tmp_path):
    shards, src = source
    # the other refusals: tests/unit/finetune/test_finetune_pieces.py (check_source, in one process)
    for setting, words in (("finetune.init_from=/nonexistent", "finetune.init_from: folder not found"),
                           ("data.fraction=0.05", "data.fraction: (0.05) keeps 1 of 18 samples")):
        result = run([python()] + _finetune(src, tmp_path / "bad", "finetune.mode=routers", setting), timeout_s=60)
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and len(errors) == 1 and words in errors[0], result.output
