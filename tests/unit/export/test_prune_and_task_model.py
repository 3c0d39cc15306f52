"""Pruning rules, the standalone per-task model against the full model, and loading the exported files
with plain PyTorch and timm (one process, no DeepSpeed)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from modsquad_ds.config import load_config
from modsquad_ds.config.loader import to_dict
from modsquad_ds.export.files import load_whole_model, write_task_model, write_whole_model
from modsquad_ds.export.prune import kept_experts, prune_plan, pruned_task_model, usage_share
from modsquad_ds.export.task_model import TaskViT
from modsquad_ds.model.vit import ModSquadViT
from modsquad_ds.moe.router import RoutingResult, TaskRouter
from modsquad_ds.train.checkpoint import CheckpointError, ResumeMismatch, check_layout
from modsquad_ds.train.usage import UsageAccumulator

TASKS = ["class_scene", "depth_zbuffer", "normal"]
FORBIDDEN = {"blocks.0.attn": [0, 3], "blocks.1.mlp": [5], "blocks.2.attn": [1, 2, 7], "blocks.3.mlp": [0, 6]}


@dataclass
class Weights:  # what pruned_task_model reads of CheckpointWeights
    model: dict
    config: object


@pytest.fixture(scope="module")
def trained():
    """A tiny model whose task 1 (depth_zbuffer) can never choose the FORBIDDEN experts: the MoE
    blocks' norms get a bias of 1 and those router columns a constant -1, so their logits are
    -embed_dim whatever the token (LayerNorm's normalised part sums to zero)."""
    cfg = load_config(preset="tiny", overrides=[f"tasks.names=[{','.join(TASKS)}]"])
    torch.manual_seed(0)
    model = ModSquadViT(cfg.model, cfg.moe, cfg.tasks.names).eval()
    with torch.no_grad():
        for layer, experts in FORBIDDEN.items():
            block = model.get_submodule(layer.rsplit(".", 1)[0])
            norm = block.norm1 if layer.endswith("attn") else block.norm2
            norm.weight.fill_(1.0)
            norm.bias.fill_(1.0)
            router = model.get_submodule(layer).router
            router.task_wg[1][:, experts] = -1.0
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(images)
    usage = UsageAccumulator(cfg.tasks.names)
    usage.add(out.routing)
    return cfg, model, images, out, usage.global_tables()


def _task_model(cfg, model, task, plan) -> TaskViT:
    config, state = pruned_task_model(Weights(model.state_dict(), cfg), task, plan)
    task_model = TaskViT(config)
    task_model.load_state_dict(state, strict=True)
    return task_model.eval()


def test_theta_zero_drops_exactly_the_unused_experts_and_equals_the_full_model(trained):
    cfg, model, images, out, tables = trained
    plan = prune_plan(tables, 1, threshold=0.0)
    for layer, experts in FORBIDDEN.items():
        used = [e for e, n in enumerate(tables[layer]["counts"][1].tolist()) if n > 0]
        assert plan[layer]["kept"] == used and not set(used) & set(experts)
    task_model = _task_model(cfg, model, "depth_zbuffer", plan)
    with torch.no_grad():
        pred = task_model(images)
    torch.testing.assert_close(pred, out.preds["depth_zbuffer"], rtol=1e-6, atol=1e-6)
    full = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in task_model.parameters()) < full
    for i, task in enumerate(TASKS):  # every task: θ = 0 on its calibration data changes nothing
        with torch.no_grad():
            pred = _task_model(cfg, model, task, prune_plan(tables, i, threshold=0.0))(images)
        torch.testing.assert_close(pred, out.preds[task], rtol=1e-6, atol=1e-6)


class MaskedRouter(torch.nn.Module):
    """Reference for a pruned layer: the full router, top-k restricted to ``kept`` (ids stay global)."""

    def __init__(self, router: TaskRouter, kept: list[int], top_k: int):
        super().__init__()
        self.router, self.kept, self.top_k = router, torch.tensor(kept), top_k
        self.num_experts = router.num_experts

    @property
    def num_tasks(self):
        return self.router.num_tasks

    def forward(self, x_TSD, task_ids_T):
        r = self.router(x_TSD, task_ids_T)
        masked = torch.full_like(r.probs_TSE, -1.0)
        masked[..., self.kept] = r.probs_TSE[..., self.kept]
        gates, ids = masked.topk(self.top_k, dim=-1)
        return RoutingResult(r.logits_TSE, r.probs_TSE, ids, gates)


def test_keep_top_prunes_lowers_top_k_and_equals_the_masked_full_model(trained):
    cfg, model, images, _, tables = trained
    plan = prune_plan(tables, 2, keep_top=0.25)  # 2 of 8 experts per layer; MoA top-k 4 -> 2
    assert all(len(p["kept"]) == 2 for p in plan.values())
    assert plan["blocks.0.attn"]["top_k"] == 2 and plan["blocks.1.mlp"]["top_k"] == 2
    task_model = _task_model(cfg, model, "normal", plan)
    reference = ModSquadViT(cfg.model, cfg.moe, cfg.tasks.names).eval()
    reference.load_state_dict(model.state_dict())
    for layer, p in plan.items():
        moe = reference.get_submodule(layer)
        moe.router = MaskedRouter(moe.router, p["kept"], p["top_k"])
    with torch.no_grad():
        expected = reference(images, ["normal"]).preds["normal"]
        pred = task_model(images)
    torch.testing.assert_close(pred, expected, rtol=1e-6, atol=1e-6)


def test_kept_expert_rules():
    counts = torch.tensor([50.0, 30.0, 19.0, 1.0, 0.0])
    share = usage_share(counts[None], torch.tensor([50.0]), top_k=2)[0]  # 100 choices
    assert torch.allclose(share, torch.tensor([0.5, 0.3, 0.19, 0.01, 0.0], dtype=torch.float64))
    assert kept_experts(share, counts, threshold=0.01) == [0, 1, 2, 3]  # the paper's θ = 1%: >= keeps
    assert kept_experts(share, counts, threshold=0.02) == [0, 1, 2]
    assert kept_experts(share, counts, threshold=0.0) == [0, 1, 2, 3]  # never used: always dropped
    assert kept_experts(share, counts, keep_top=0.4) == [0, 1]  # ceil(0.4 * 5) = 2 most used
    assert kept_experts(share, counts, keep_top=1.0) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        kept_experts(share, counts)


def test_keep_top_breaks_ties_by_the_lower_expert_id():
    """``keep_top`` ranks by usage share, and an equal share goes to the lower expert id (the
    documented tie rule), so the kept set does not depend on the order of equal floats."""
    counts = torch.tensor([10.0, 30.0, 0.0, 30.0, 30.0])
    share = usage_share(counts[None], torch.tensor([100.0]), top_k=1)[0]  # 0.1, 0.3, 0, 0.3, 0.3
    assert kept_experts(share, counts, keep_top=0.2) == [1]  # ceil(0.2 * 5) = 1 of three tied at 0.3
    assert kept_experts(share, counts, keep_top=0.4) == [1, 3]  # 2 of the three tied: ids 1 and 3
    assert kept_experts(share, counts, keep_top=0.6) == [1, 3, 4]
    assert kept_experts(share, counts, keep_top=0.8) == [0, 1, 3, 4]  # expert 2 unused: never kept


def test_exported_files_load_with_plain_torch_and_timm(trained, tmp_path):
    cfg, model, images, out, tables = trained
    config, state = pruned_task_model(Weights(model.state_dict(), cfg), "class_scene",
                                      prune_plan(tables, 0, threshold=0.0))
    path = write_task_model(tmp_path, config, state)
    plain = TaskViT(json.loads(path.with_suffix(".json").read_text()))
    plain.load_state_dict(load_file(str(path)), strict=True)
    via_timm = timm.create_model("modsquad_task_vit", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    with torch.no_grad():
        for m in (plain.eval(), via_timm, TaskViT.from_file(path)):
            torch.testing.assert_close(m(images), out.preds["class_scene"], rtol=1e-6, atol=1e-6)
    assert not list(tmp_path.glob(".*.tmp"))


def test_whole_model_round_trip(trained, tmp_path):
    cfg, model, images, out, _ = trained
    path = write_whole_model(tmp_path, to_dict(cfg), model.state_dict())
    loaded, loaded_cfg = load_whole_model(path)
    assert loaded_cfg.tasks.names == TASKS
    with torch.no_grad():
        again = loaded(images)
    for task in TASKS:
        assert torch.equal(again.preds[task], out.preds[task])


def test_resume_refusal_points_at_reshard(tmp_path: Path):
    folder = tmp_path / "run" / "checkpoints" / "step_00000004"
    folder.mkdir(parents=True)
    (folder / "layout.json").write_text(json.dumps({"world_size": 2, "train.ep_size": 2, "data.workers": 1}))
    with pytest.raises(ResumeMismatch, match=r"python -m modsquad_ds.reshard --run .*run --world-size N"):
        check_layout(folder, {"world_size": 4, "train.ep_size": 2})
    with pytest.raises(ResumeMismatch, match="--no-resume"):
        check_layout(folder, {"world_size": 2, "data.workers": 3})


def test_calibration_on_a_split_the_shards_lack_names_the_splits_there(tmp_path: Path):
    from modsquad_ds.config import load_config
    from modsquad_ds.export.usage import calibration_usage

    (tmp_path / "train.index.json").write_text("{}")
    (tmp_path / "test.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"no val.index.json for --split val \(splits there: test, train\)"):
        calibration_usage(None, load_config(preset="tiny"), str(tmp_path), "val", None)


def test_report_table_by_hand():
    """One row: 2.5 M of a 10 M full model (25 %) and of a 5 M dense ViT (50 %), FLOPs in G per image."""
    from modsquad_ds.export.report import markdown_table

    row = {"task": "normal", "params": 2_500_000, "full_params": 10_000_000, "dense_params": 5_000_000,
           "params_vs_full": 0.25, "macs": 1_500_000_000, "full_macs": 3_000_000_000, "dense_macs": 2_000_000_000,
           "kept": 6, "experts": 16}
    lines = markdown_table([row]).splitlines()
    assert lines[2] == "| normal | 2.500 | 25.0% | 50.0% | 1.5000 | 3.0000 | 2.0000 | 6/16 |"
    assert lines[4].startswith("full model: 10.000 M parameters (all tasks); dense multi-task ViT: 5.000 M.")


def test_task_costs_are_per_image_whatever_the_batch(trained):
    """The report's FLOPs are per image: a batch of 4 gives what one image gives; parameters are the
    models' own counts, and the full model's share is their ratio."""
    from modsquad_ds.export.report import task_costs
    from modsquad_ds.model.flops import count_params, forward_macs

    cfg, model, images, _, tables = trained
    task_model = _task_model(cfg, model, "depth_zbuffer", prune_plan(tables, 1, threshold=0.0))
    row = task_costs(task_model, model, model, "depth_zbuffer", images)
    assert row["macs"] == forward_macs(task_model, images[:1]) and row["full_macs"] == row["dense_macs"]
    assert row["full_macs"] == forward_macs(model, images[:1], ["depth_zbuffer"])
    assert row["params"] == count_params(task_model) < row["full_params"] == count_params(model)
    assert row["params_vs_full"] == row["params"] / row["full_params"]
