"""The export reader on real DeepSpeed checkpoints (2 gloo ranks, the trainer's engine and save):
ZeRO 0 fp32 and bf16, ZeRO 1 bf16 and ZeRO 2 bf16, each at ep_size 2 and, after a reshard, at ep_size 1.

One launch makes all six checkpoints (tests/distributed/scripts/export_worker.py); every rank also
dumped the fp32 weights its engine really held, which the reader must reproduce bit for bit.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _ep_harness import run_workers
from modsquad_ds.export.pipeline import export_run, full_model
from modsquad_ds.export.reader import (SOURCE_MASTER, SOURCE_MODULE, SOURCE_UPCAST, CheckpointError,
                                       load_checkpoint_weights)
from modsquad_ds.export.reshard import _zero0_moments, _zero_moments, reshard
from modsquad_ds.export.task_model import TaskViT
from modsquad_ds.moe.ds_adapter import reference_key
from modsquad_ds.train import manifest

pytestmark = [pytest.mark.dist, pytest.mark.timeout(400)]

CASES = ["zero0_fp32", "zero0_bf16", "zero1_bf16", "zero2_bf16"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export_ckpt")
    run_workers("export_worker.py", out, world_size=2, args=tuple(CASES), timeout_s=360)
    return out


def _engine_reference(run: Path) -> dict[str, torch.Tensor]:
    merged = {}
    for rank in range(2):  # dense weights are the same on both ranks; experts differ by global id
        merged.update(torch.load(run / f"reference_rank{rank}.pt", weights_only=True))
    return {reference_key(k[len("model."):]): v for k, v in merged.items() if k.startswith("model.")}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("ep", ["ep2", "ep1"])
def test_reader_gives_the_engines_fp32_weights(runs, case, ep):
    w = load_checkpoint_weights(runs / case / ep)
    reference = _engine_reference(runs / case / ep)
    assert sorted(w.model) == sorted(reference)
    for key, value in reference.items():
        assert torch.equal(w.model[key], value), key
    assert w.source == (SOURCE_MODULE if case.endswith("fp32") else SOURCE_MASTER)
    assert w.config.train.ep_size == int(ep[2:]) and w.world_size == 2 and w.step == 2
    assert all(v.dtype == torch.float32 for v in w.model.values())


@pytest.mark.parametrize("case", CASES)
def test_export_from_ep2_equals_export_from_ep1(runs, case, tmp_path):
    """The same weights saved at ep_size 2 and at ep_size 1 (resharded, resumed, saved natively)
    export to identical task models."""
    exports = {}
    for ep in ("ep2", "ep1"):
        summary = export_run(runs / case / ep, threshold=0.0, out=tmp_path / ep, costs=False)
        exports[ep] = {row["task"]: load_file(row["file"]) for row in summary["tasks"]}
    assert exports["ep2"].keys() == exports["ep1"].keys()
    for task, tensors in exports["ep2"].items():
        other = exports["ep1"][task]
        assert tensors.keys() == other.keys()
        assert all(torch.equal(tensors[k], other[k]) for k in tensors), task
    w = load_checkpoint_weights(runs / case / "ep1")
    w2 = load_checkpoint_weights(runs / case / "ep2")
    assert all(torch.equal(w.objective[k], w2.objective[k]) for k in w.objective)


@pytest.mark.parametrize("case", CASES)
def test_reshard_carries_the_optimizer_state_exactly(runs, case):
    a = load_checkpoint_weights(runs / case / "ep2")
    b = load_checkpoint_weights(runs / case / "ep1")
    if a.zero_stage:
        (ma, sa), (mb, sb) = _zero_moments(a.folder, 2, 2, 4), _zero_moments(b.folder, 2, 1, 8)
    else:
        (ma, sa), (mb, sb) = _zero0_moments(a.folder, a.config), _zero0_moments(b.folder, b.config)
    assert sa == sb == 2
    for kind in ma:
        assert ma[kind].keys() == mb[kind].keys() and len(ma[kind]) > 100
        for name, value in ma[kind].items():
            assert torch.equal(value, mb[kind][name]), (kind, name)


@pytest.mark.parametrize("case", ["zero0_bf16", "zero2_bf16"])
def test_bf16_master_weights_are_fp32_and_round_to_the_saved_weights(runs, case):
    w = load_checkpoint_weights(runs / case / "ep2")
    folder = w.folder
    saved = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert saved["model.cls_token"].dtype == torch.bfloat16
    # trained fp32 masters carry bits bf16 cannot hold; each rounds to the bf16 weight that was saved
    assert not torch.equal(w.model["pos_embed"], w.model["pos_embed"].bfloat16().float())
    assert torch.equal(w.model["pos_embed"].bfloat16(), saved["model.pos_embed"])


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / run.name
    shutil.copytree(run, dst)
    return dst


@pytest.mark.parametrize("case", ["zero0_bf16", "zero1_bf16"])
def test_bf16_without_optimizer_files_upcasts_and_says_so(runs, tmp_path, case):
    run = _copy(runs / case / "ep2", tmp_path)
    folder = load_checkpoint_weights(run).folder
    for f in folder.glob("*optim_states.pt"):
        f.unlink()
    manifest.write(folder, manifest.build(folder, collective=False))  # as a save without them writes it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w = load_checkpoint_weights(run)
    assert w.source == SOURCE_UPCAST and any(SOURCE_UPCAST in str(c.message) for c in caught)
    assert torch.equal(w.model["pos_embed"], w.model["pos_embed"].bfloat16().float())
    with pytest.raises(CheckpointError, match="fp32 master weights are not in the folder"):
        load_checkpoint_weights(run, require_master=True)


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("damage, expected", [
    ("no_config", "missing config.yaml"),
    ("no_model_states", "missing mp_rank_00_model_states.pt"),
    ("no_expert", "missing layer_1_expert_5_mp_rank_00_model_states.pt"),
    ("truncated_expert", "layer_0_expert_3_mp_rank_00_model_states.pt: unreadable"),
    ("no_partition", "missing the optimizer partition of rank 1"),
    ("only_partial", "no complete checkpoint"),
    ("foreign_file", "mp_rank_00_model_states.pt: not a DeepSpeed checkpoint file"),
    ("other_model", "config.yaml"),
    ("unknown_step", "no complete checkpoint for step 7"),
])
def test_broken_folders_fail_with_one_line_naming_the_piece(runs, tmp_path, damage, expected):
    run = _copy(runs / "zero1_bf16" / "ep2", tmp_path)
    folder = load_checkpoint_weights(run).folder
    # the reader's own checks, for folders without a manifest (saved before manifests existed)
    (folder / "manifest.json").unlink()
    step = None
    if damage == "no_config":
        (run / "config.yaml").unlink()
    elif damage == "no_model_states":
        (folder / "mp_rank_00_model_states.pt").unlink()
    elif damage == "no_expert":
        (folder / "layer_1_expert_5_mp_rank_00_model_states.pt").unlink()
    elif damage == "truncated_expert":
        path = folder / "layer_0_expert_3_mp_rank_00_model_states.pt"
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "no_partition":
        (folder / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    elif damage == "only_partial":
        folder.rename(folder.with_name(".partial-" + folder.name))
    elif damage == "foreign_file":
        torch.save([torch.zeros(2)], folder / "mp_rank_00_model_states.pt")
    elif damage == "other_model":
        text = (run / "config.yaml").read_text().replace("embed_dim: 64", "embed_dim: 32")
        (run / "config.yaml").write_text(text)
    elif damage == "unknown_step":
        step = 7
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_weights(run, step)
    assert expected in _one_line(err)


def test_a_flipped_byte_is_refused_before_export_or_reshard_reads_it(runs, tmp_path):
    """A damaged tensor loads without an error: the manifest's SHA-256 is what catches it (a reshard
    would otherwise write it into a new checkpoint under a fresh, matching manifest)."""
    run = _copy(runs / "zero1_bf16" / "ep2", tmp_path)
    path = load_checkpoint_weights(run).folder / "mp_rank_00_model_states.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_weights(run)
    assert "is damaged:" in _one_line(err) and "mp_rank_00_model_states.pt does not match its SHA-256" in str(err.value)
    with pytest.raises(CheckpointError, match="is damaged"):
        reshard(run, tmp_path / "resharded", world_size=1)
    assert not (tmp_path / "resharded").exists()


def test_reshard_refuses_a_folder_that_is_not_empty(runs, tmp_path):
    used = tmp_path / "used"
    (used / "checkpoints").mkdir(parents=True)  # another run's, or a live one's
    with pytest.raises(CheckpointError, match=f"--out {used} exists and is not empty"):
        reshard(runs / "zero1_bf16" / "ep2", used, world_size=1)


def test_theta_zero_export_equals_the_full_model_on_calibration_data(runs, tmp_path):
    """θ = 0 with usage measured on data keeps every expert the task chose there, so on that data
    the task model's outputs equal the full model's."""
    from modsquad_ds.train.usage import UsageAccumulator
    from modsquad_ds.export.prune import prune_plan, pruned_task_model

    w = load_checkpoint_weights(runs / "zero2_bf16" / "ep2")
    model = full_model(w)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    usage = UsageAccumulator(w.config.tasks.names)
    with torch.no_grad():
        out = model(images)
    usage.add(out.routing)
    tables = usage.global_tables()
    for i, task in enumerate(w.config.tasks.names):
        config, state = pruned_task_model(w, task, prune_plan(tables, i, threshold=0.0))
        task_model = TaskViT(config)
        task_model.load_state_dict(state, strict=True)
        with torch.no_grad():
            pred = task_model(images)
        torch.testing.assert_close(pred, out.preds[task], rtol=1e-6, atol=1e-6)


def test_export_command_writes_models_report_and_picture(runs, tmp_path, capsys):
    from modsquad_ds.export.__main__ import main

    run = runs / "zero1_bf16" / "ep2"
    assert main(["--run", str(run), "--threshold", "1.0", "--out", str(tmp_path / "tasks"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "tasks" / "report.json").read_text())
    assert report["weights"] == SOURCE_MASTER and report["usage"].startswith("training statistics, all ranks")
    for row in report["tasks"]:
        assert 0 < row["params"] < row["full_params"] and row["macs"] <= row["full_macs"]
        model = TaskViT.from_file(row["file"])
        assert model.task == row["task"]
    assert (tmp_path / "tasks" / "kept_experts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| depth_zbuffer |" in (tmp_path / "tasks" / "report.md").read_text()
    # again into the same folder, other tasks and pruning: it replaces the first export, not mixes with it
    (tmp_path / "tasks" / "notes.txt").write_text("mine")
    assert main(["--run", str(run), "--keep-top", "50", "--tasks", "edge_texture", "--out", str(tmp_path / "tasks"),
                 "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "tasks").iterdir()) == [
        "edge_texture.json", "edge_texture.safetensors", "kept_experts.png", "notes.txt", "report.json", "report.md"]
    assert main(["--run", str(run), "--whole", "--out", str(tmp_path / "whole")]) == 0
    assert (tmp_path / "whole" / "whole.safetensors").is_file()
    assert main(["--run", str(tmp_path), "--threshold", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.yaml" in err[0]
