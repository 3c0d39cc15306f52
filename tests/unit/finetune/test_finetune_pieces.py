"""Router fine-tuning pieces in one process: which weights train, what is copied from the source,
and every refusal before launch."""

import re

import pytest
import torch

from modsquad_ds.config import ConfigError, load_config, save_config
from modsquad_ds.finetune import check_source, finetune_ds_config, freeze, is_task_specific, load_shared_weights
from modsquad_ds.finetune import trainable_names
from modsquad_ds.model.objective import MultiTaskObjective
from modsquad_ds.model.vit import ModSquadViT
from modsquad_ds.train.module import TrainModule

SOURCE_TASKS = ["depth_euclidean", "normal", "edge_texture"]
NEW_TASKS = ["class_scene", "keypoints2d"]


def _cfg(tasks, *extra):
    return load_config(preset="tiny", overrides=[f"tasks.names=[{','.join(tasks)}]", *extra])


def _module(cfg, seed=0):
    torch.manual_seed(seed)
    return TrainModule(ModSquadViT(cfg.model, cfg.moe, cfg.tasks.names), MultiTaskObjective(cfg), lambda t: t)


ROUTER = re.compile(r"^model\.blocks\.\d+\.(attn|mlp)\.router\.task_w(g|noise)$")


@pytest.mark.parametrize("mode", ["routers", "heads", "all"])
def test_each_mode_trains_exactly_its_weights(mode):
    module = _module(_cfg(NEW_TASKS))
    names = {n for n, _ in module.named_parameters()}
    expected = {
        "all": names,
        "heads": {n for n in names if n.startswith(("model.heads.", "objective."))},
        "routers": {n for n in names if n.startswith(("model.heads.", "objective.")) or n == "model.task_embed"
                    or ROUTER.match(n)},
    }[mode]
    assert trainable_names(module, mode) == expected
    report = freeze(module, mode)
    assert {n for n, p in module.named_parameters() if p.requires_grad} == expected
    assert report.trainable == sum(p.numel() for n, p in module.named_parameters() if n in expected)
    assert set(report.frozen_names) == names - expected
    if mode == "routers":  # 4 MoE layers x (task_wg, task_wnoise), the embedding, 2 heads x 2, log_vars
        assert len(expected) == 8 + 1 + 4 + 1
        assert not any("experts" in n or ".kv." in n or "norm" in n for n in expected)


def test_frozen_weights_get_no_gradient_and_no_optimizer_state():
    from modsquad_ds.data.synthetic import synthetic_batch
    from modsquad_ds.moe.ds_adapter import moe_param_groups

    module = _module(_cfg(NEW_TASKS))
    freeze(module, "routers")
    loss, _, _ = module(synthetic_batch(NEW_TASKS, 2, 32, torch.Generator().manual_seed(0)))
    loss.backward()
    for name, p in module.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    grouped = [p for g in moe_param_groups(module, 0.05, ("task_embed", "log_vars")) for p in g["params"]]
    assert {id(p) for p in grouped} == {id(p) for p in module.parameters() if p.requires_grad}


def test_shared_weights_come_from_the_source_and_new_rows_are_fresh_or_copied():
    torch.manual_seed(1)
    source_cfg = _cfg(SOURCE_TASKS)
    source = ModSquadViT(source_cfg.model, source_cfg.moe, SOURCE_TASKS)
    for p in source.parameters():  # away from any initialisation the new model could share
        torch.nn.init.normal_(p)
    src = source.state_dict()
    cfg = _cfg(NEW_TASKS)
    torch.manual_seed(2)
    model = ModSquadViT(cfg.model, cfg.moe, NEW_TASKS)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    load_shared_weights(model, src, SOURCE_TASKS, {"keypoints2d": "edge_texture"})
    after = model.state_dict()
    shared = [k for k in after if not is_task_specific(k)]
    assert len(shared) > 50 and all(torch.equal(after[k], src[k]) for k in shared)
    rows = [k for k in after if k == "task_embed" or k.endswith(("router.task_wg", "router.task_wnoise"))]
    assert len(rows) == 9
    for k in rows:
        assert torch.equal(after[k][1], src[k][2]), f"{k}: keypoints2d starts from edge_texture's row"
        assert torch.equal(after[k][0], fresh[k][0]), f"{k}: class_scene keeps its fresh row"
    for k in after:
        if k.startswith("heads."):
            assert torch.equal(after[k], fresh[k]), "heads are always new"


def test_a_backbone_of_another_shape_is_refused_by_name():
    other = _cfg(SOURCE_TASKS, "model.mlp_ratio=2.0")
    src = ModSquadViT(other.model, other.moe, SOURCE_TASKS).state_dict()
    cfg = _cfg(NEW_TASKS)
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.mlp\.fc1\.bias: shape \(128,\) in the source checkpoint, \(256,\) in this"):
        load_shared_weights(ModSquadViT(cfg.model, cfg.moe, NEW_TASKS), src, SOURCE_TASKS)
    del src["norm.weight"]
    with pytest.raises(ValueError, match="lacks norm.weight"):
        load_shared_weights(ModSquadViT(cfg.model, cfg.moe, NEW_TASKS), src, SOURCE_TASKS)


@pytest.mark.parametrize("overrides, key", [
    (["finetune.init_from=runs/x"], "finetune.mode"),
    (["finetune.mode=routers"], "finetune.init_from"),
    (["finetune.step=3"], "finetune.mode"),
    (["finetune.mode=routers", "finetune.init_from=r", "finetune.init_tasks={normal: depth_euclidean}"],
     "finetune.init_tasks.normal"),
    (["finetune.mode=sideways"], "finetune.mode"),
    (["data.fraction=0"], "data.fraction"),
    (["data.fraction=1.5"], "data.fraction"),
])
def test_config_refusals_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        _cfg(NEW_TASKS, *overrides)
    assert str(err.value).startswith(key), str(err.value)


@pytest.fixture
def source_run(tmp_path):
    """A run folder as the trainer leaves it, as far as the pre-launch checks read it."""
    run = tmp_path / "src"
    (run / "checkpoints" / "step_00000004").mkdir(parents=True)
    save_config(_cfg(SOURCE_TASKS), run / "config.yaml")
    return run


def _ft(run, *extra, tasks=NEW_TASKS, out="out"):
    return _cfg(tasks, "finetune.mode=routers", f"finetune.init_from={run}",
                f"train.out_dir={run.parent / out}", *extra)


def test_check_source_accepts_a_matching_run(source_run):
    found = check_source(_ft(source_run, "finetune.init_tasks={keypoints2d: normal}", "moe.mlp.top_k=1",
                             "moe.mlp.expert_dim=128"))
    assert found.step == 4 and found.config.tasks.names == SOURCE_TASKS


@pytest.mark.parametrize("setup, extra, key, words", [
    ("missing", [], "finetune.init_from", "folder not found"),
    ("no_config", [], "finetune.init_from", "not a run folder"),
    ("no_checkpoint", [], "", "no complete checkpoint"),
    ("ok", ["finetune.step=9"], "", "no complete checkpoint for step 9"),
    ("ok", ["model.embed_dim=32"], "model.embed_dim", "differs from the source run's (64"),
    ("ok", ["moe.mlp.num_experts=4"], "moe.mlp.num_experts", "differs"),
    ("ok", ["finetune.init_tasks={keypoints2d: class_object}"], "finetune.init_tasks.keypoints2d",
     "not a task of the source run"),
    ("same_out", [], "train.out_dir", "is the source run"),
])
def test_check_source_refuses_with_one_line(source_run, setup, extra, key, words):
    run = source_run
    if setup == "missing":
        run = source_run.parent / "nope"
    elif setup == "no_config":
        (source_run / "config.yaml").unlink()
    elif setup == "no_checkpoint":
        (source_run / "checkpoints" / "step_00000004").rename(source_run / "checkpoints" / ".partial-step_00000004")
    out = "src" if setup == "same_out" else "out"
    with pytest.raises(ConfigError) as err:
        check_source(_ft(run, *extra, out=out))
    message = str(err.value)
    assert "\n" not in message and words in message and err.value.key == key, message


def test_frozen_expert_modes_run_at_zero_stage_0_and_full_keeps_the_stage(source_run):
    ds = {"zero_optimization": {"stage": 2, "contiguous_gradients": True}, "train_micro_batch_size_per_gpu": 4}
    for mode, stage in (("routers", 0), ("heads", 0), ("all", 2)):
        out = finetune_ds_config(_ft(source_run, f"finetune.mode={mode}"), ds)
        assert out["zero_optimization"] == {"stage": stage, "contiguous_gradients": True}
    assert ds["zero_optimization"]["stage"] == 2, "the caller's dict is not modified"
