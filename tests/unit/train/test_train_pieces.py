import json
import math
import random

import numpy as np
import pytest
import torch

from modsquad_ds.config import load_config
from modsquad_ds.moe.stats import RoutingStats
from modsquad_ds.train import checkpoint
from modsquad_ds.train.schedule import warmup_cosine
from modsquad_ds.train.trainer import _mean_over_ranks, manual_clip_norm
from modsquad_ds.train.usage import UsageAccumulator, write_usage


def test_warmup_then_cosine_hand_values():
    lr = lambda s: warmup_cosine(s, total=10, warmup=2, base_lr=1.0, min_lr=0.1)  # noqa: E731
    assert [lr(0), lr(1)] == [0.5, 1.0]
    assert lr(2) == pytest.approx(1.0)
    assert lr(6) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr(10) == pytest.approx(0.1) and lr(50) == pytest.approx(0.1)


def test_logged_statistics_are_means_over_the_window_micro_steps():
    """A log window's statistics are summed over its micro steps (grad_accum x log_every of them) and
    logged as their mean; one process, so no rank average."""
    sums = {"loss/total": torch.tensor(6.0), "mi/blocks.1.mlp": torch.tensor(0.75, dtype=torch.float64)}
    assert _mean_over_ranks(sums, 3) == {"loss/total": 2.0, "mi/blocks.1.mlp": 0.25}
    assert _mean_over_ranks(sums, 0) == {"loss/total": 6.0, "mi/blocks.1.mlp": 0.75}  # an empty window


@pytest.mark.parametrize("zero, ep, clip, expected", [
    (0, 2, 1.0, 1.0), (0, 1, 1.0, 0.0), (1, 2, 1.0, 0.0), (2, 2, 1.0, 0.0), (0, 2, 0.0, 0.0)])
def test_trainer_clips_itself_only_where_deepspeed_is_wrong(zero, ep, clip, expected):
    cfg = load_config(overrides=[f"train.ep_size={ep}"])
    ds = {"zero_optimization": {"stage": zero}, "gradient_clipping": clip}
    assert manual_clip_norm(cfg, ds) == expected


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(9), random.seed(9), np.random.seed(9)
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


def test_only_complete_checkpoint_folders_count(tmp_path):
    for name in ("step_00000002", ".partial-step_00000004", "step_00000001", "latest"):
        (tmp_path / name).mkdir()
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_00000001", "step_00000002"]


def test_step_of_inverts_tag_for(tmp_path):
    assert checkpoint.step_of(tmp_path / checkpoint.tag_for(1234)) == 1234
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        checkpoint.step_of(tmp_path / "damaged-step_00000003")


def test_usage_frequencies_per_task_and_expert(tmp_path):
    acc = UsageAccumulator(["a", "b"])
    counts = torch.tensor([[4.0, 0.0, 4.0], [0.0, 8.0, 0.0]])
    stats = RoutingStats("blocks.1.mlp", "mlp", counts, counts, torch.tensor([4.0, 4.0]), 2)
    acc.add([stats])
    acc.add([stats])
    write_usage(tmp_path / "usage.json", ["a", "b"], acc.global_tables())
    doc = json.loads((tmp_path / "usage.json").read_text())
    layer = doc["layers"][0]
    assert doc["tasks"] == ["a", "b"] and layer["layer"] == "blocks.1.mlp"
    assert layer["frequency"] == [[1.0, 0.0, 1.0], [0.0, 2.0, 0.0]]  # rows sum to top_k
    assert layer["tokens"] == [8.0, 8.0]


def test_preflight_names_a_missing_data_folder(tmp_path):
    from modsquad_ds.config import ConfigError, load_config
    from modsquad_ds.train.preflight import check_run

    missing = tmp_path / "no_such_release"
    raw = load_config(preset="tiny", overrides=["data.source=raw", f"data.raw_root={missing}",
                                                f"train.out_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=rf"^data\.raw_root: folder not found: {missing}$"):
        check_run(raw, world_size=1)
    shards = load_config(preset="tiny", overrides=["data.source=shards", f"data.shards_dir={missing}",
                                                   f"train.out_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"^data\.shards_dir: "):
        check_run(shards, world_size=1)


@pytest.fixture(scope="module")
def raw_release(tmp_path_factory):
    from data_tools.mini_taskonomy import generate

    root = tmp_path_factory.mktemp("raw")
    generate(root, buildings=3, points=2, views=2, resolution=16, seed=0, workers=1, progress=False)
    return root  # 3 buildings: train, val, test; 4 views each


@pytest.mark.parametrize("override, message", [
    ("data.batch_size=8", r"^data\.batch_size: the split has 4 samples, fewer than world_size \(1\) x batch_size \(8\)"),
    ("data.fraction=0.3", r"^data\.fraction: \(0\.3\) keeps 1 of 4 samples"),
    ("data.train_split=bogus", r"^data\.train_split: 'bogus' is not a column of .*\(train, val, test\)$"),
    ("data.split_csv=/no/such.csv", r"^data\.split_csv: unreadable: "),
    ("train.eval_every=5", r"^data\.val_split: 'nosuch' is not a column"),  # with data.val_split=nosuch below
])
def test_preflight_of_a_raw_release_refuses_what_would_fail_later(raw_release, tmp_path, override, message):
    """Each of these failed with a traceback on every rank once the loader ran (the bad validation
    split only at the first evaluation, train.eval_every steps into the run)."""
    from modsquad_ds.config import ConfigError, load_config
    from modsquad_ds.train.preflight import check_run

    csv = raw_release / "splits" / "train_val_test_mini.csv"
    cfg = load_config(preset="tiny", overrides=["data.source=raw", f"data.raw_root={raw_release}",
                                                f"data.split_csv={csv}", "data.batch_size=2", "data.val_split=nosuch",
                                                f"train.out_dir={tmp_path / 'run'}", override])
    with pytest.raises(ConfigError, match=message):
        check_run(cfg, world_size=1)
    fine = load_config(preset="tiny", overrides=["data.source=raw", f"data.raw_root={raw_release}",
                                                 f"data.split_csv={csv}", "data.batch_size=2",
                                                 f"train.out_dir={tmp_path / 'run'}"])
    check_run(fine, world_size=2)  # 4 samples: one batch of 2 per rank


def _complete(root, step, payload=b"weights"):
    """A complete checkpoint folder as save() leaves it: a file and its manifest."""
    from modsquad_ds.train import manifest

    folder = root / checkpoint.tag_for(step)
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(payload * (step + 1))
    manifest.write(folder, manifest.build(folder))
    return folder


def test_find_checkpoint_trusts_latest_only_when_it_names_a_complete_folder(tmp_path):
    """``latest`` may name a folder that was pruned or never finished: the newest complete one is
    chosen instead; an explicit step, step 0 included, names its folder or is refused listing the
    complete steps."""
    root = tmp_path / "checkpoints"
    for step in (0, 5, 2):
        _complete(root, step)
    (root / ".partial-step_00000007").mkdir()
    (root / "latest").write_text("step_00000002\n")
    assert checkpoint.find_checkpoint(tmp_path) == root / "step_00000002"
    for gone in ("step_00000009", ".partial-step_00000007"):
        (root / "latest").write_text(gone)
        assert checkpoint.find_checkpoint(tmp_path) == root / "step_00000005"
    assert checkpoint.find_checkpoint(tmp_path, step=0) == root / "step_00000000"
    with pytest.raises(checkpoint.CheckpointError, match=r"no complete checkpoint for step 7 \(complete steps: 0, 2, 5\)"):
        checkpoint.find_checkpoint(tmp_path, step=7)


def test_newest_intact_sets_damaged_newer_folders_aside_and_repoints_latest(tmp_path):
    """Steps 2, 4, 6, 8 with 6 and 8 damaged: resume picks 4 (not the oldest intact, 2), renames 6 and
    8 to damaged-*, reports each once, and ``latest`` names 4 afterwards."""
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        _complete(root, step)
    (root / "latest").write_text("step_00000008")
    (root / "step_00000006" / "mp_rank_00_model_states.pt").write_bytes(b"cut")
    (root / "step_00000008" / "mp_rank_00_model_states.pt").unlink()
    skipped = []
    assert checkpoint.newest_intact(root, skipped.append) == root / "step_00000004"
    assert sorted(p.name for p in root.iterdir()) == ["damaged-step_00000006", "damaged-step_00000008", "latest",
                                                       "step_00000002", "step_00000004"]
    assert (root / "latest").read_text() == "step_00000004"
    assert [line.split(" (")[0] for line in skipped] == ["skipped checkpoint step_00000008",
                                                         "skipped checkpoint step_00000006"]
    assert "is missing" in skipped[0] and "has 3 bytes" in skipped[1]
    assert checkpoint.newest_intact(root, skipped.append) == root / "step_00000004" and len(skipped) == 2


def test_newest_intact_with_every_folder_damaged_names_the_newest_problem(tmp_path):
    root = tmp_path / "checkpoints"
    assert checkpoint.newest_intact(root) is None  # nothing saved yet: a fresh start
    for step in (1, 3):
        (_complete(root, step) / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(checkpoint.CheckpointDamaged, match=r"step_00000003/mp_rank_00_model_states\.pt has 0 bytes"):
        checkpoint.newest_intact(root)
    assert [p.name for p in checkpoint.complete_checkpoints(root)] == ["step_00000001", "step_00000003"]  # untouched


def test_schedule_with_warmup_as_long_as_the_run_and_as_a_lambda_multiplier():
    """warmup == total (a short fine-tune): no division by an empty cosine span, the rate stays at
    base_lr afterwards; lr_lambda is the rate divided by base_lr (LambdaLR multiplies it back)."""
    assert [warmup_cosine(s, total=4, warmup=4, base_lr=2.0, min_lr=0.2) for s in range(6)] == \
        [0.5, 1.0, 1.5, 2.0, 2.0, pytest.approx(0.2)]
    from modsquad_ds.train.schedule import lr_lambda

    mult = lr_lambda(total=10, warmup=2, base_lr=0.5, min_lr=0.05)
    assert [mult(0), mult(1)] == [0.5, 1.0] and mult(10) == pytest.approx(0.1) and mult(6) == pytest.approx(0.55)


def test_usage_of_a_task_without_tokens_is_zero_and_checkpointed_tables_restore(tmp_path):
    """A task that routed no token this run (0 tokens) gets frequency 0, not NaN. state_dict ->
    load_state_dict gives the same global tables; zeroed=True (every rank but one on resume) keeps the
    layers, kind and top_k with zero counts, so the next sum over ranks counts the saved sums once."""
    acc = UsageAccumulator(["a", "b"])
    counts = torch.tensor([[2.0, 0.0, 4.0], [0.0, 0.0, 0.0]])
    acc.add([RoutingStats("blocks.1.mlp", "mlp", counts, counts, torch.tensor([3.0, 0.0]), 2)])
    write_usage(tmp_path / "usage.json", ["a", "b"], acc.global_tables())
    layer = json.loads((tmp_path / "usage.json").read_text())["layers"][0]
    assert layer["frequency"] == [[2 / 3, 0.0, 4 / 3], [0.0, 0.0, 0.0]]
    restored, zeroed = UsageAccumulator(["a", "b"]), UsageAccumulator(["a", "b"])
    restored.load_state_dict(acc.state_dict())
    zeroed.load_state_dict(acc.state_dict(), zeroed=True)
    (name, saved), = acc.global_tables().items()
    got, nothing = restored.global_tables()[name], zeroed.global_tables()[name]
    assert torch.equal(got["counts"], saved["counts"]) and torch.equal(got["tokens"], saved["tokens"])
    assert (nothing["kind"], nothing["top_k"]) == ("mlp", 2)
    assert not nothing["counts"].any() and not nothing["tokens"].any() and nothing["counts"].shape == (2, 3)


@pytest.mark.parametrize("weighting", ["uncertainty", "fixed"])
def test_weight_decay_spares_what_the_modules_name_and_every_1d_weight(weighting):
    """The optimizer groups as the trainer builds them: the model and the objective name their
    no-decay parameters (timm's no_weight_decay hook); biases and norm weights are 1-D and spared too."""
    from modsquad_ds.model.factory import build_model
    from modsquad_ds.model.objective import MultiTaskObjective
    from modsquad_ds.moe.ds_adapter import moe_param_groups
    from modsquad_ds.train.module import TrainModule

    cfg = load_config(preset="tiny", overrides=[f"loss.task_weighting={weighting}"])
    module = TrainModule(build_model(cfg), MultiTaskObjective(cfg), None)
    name_of = {id(p): n for n, p in module.named_parameters()}
    decay = {wd: set() for wd in (0.0, 0.05)}
    for group in moe_param_groups(module, 0.05, module.no_weight_decay()):  # dense and expert groups
        decay[group["weight_decay"]].update(name_of[id(p)] for p in group["params"])
    named = dict(module.named_parameters())
    expected = {"model.pos_embed", "model.cls_token", "model.task_embed"} | (
        {"objective.weighting.log_vars"} if weighting == "uncertainty" else set())
    assert decay[0.0] == expected | {n for n, p in named.items() if p.ndim <= 1}
    assert decay[0.05] == set(named) - decay[0.0]
