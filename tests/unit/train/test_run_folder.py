"""What a run folder promises across launches: a resume refuses a checkpoint of another model or
optimizer format, naming the setting; starting over (train.resume false) sets the earlier run's
files aside instead of mixing with them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modsquad_ds.config import load_config
from modsquad_ds.distributed.ds_config import load_ds_config
from modsquad_ds.train.checkpoint import ResumeMismatch, check_layout, engine_format, run_layout
from modsquad_ds.train.run_lock import LOCK_NAME
from modsquad_ds.train.start_over import RUN_OUTPUTS, set_aside_earlier_run

REPO = Path(__file__).resolve().parents[3]


def _saved(tmp_path: Path, layout: dict) -> Path:
    folder = tmp_path / "run" / "checkpoints" / "step_00000010"
    folder.mkdir(parents=True)
    (folder / "layout.json").write_text(json.dumps({**layout, "step": 10}))
    return folder


@pytest.mark.parametrize("override, named", [
    ("model.num_heads=2", "model.num_heads=4"),  # loads without a shape error, into another model
    ("moe.mlp.num_experts=4", "moe.mlp={'enabled': True, 'num_experts': 8"),
    ("moe.router_noise=false", "moe.router_noise=True"),
    ("model.img_size=64", "model.img_size=32"),
])
def test_a_resume_into_another_model_is_refused_naming_the_setting(tmp_path, override, named):
    saved = load_config(preset="tiny")
    folder = _saved(tmp_path, run_layout(saved, world_size=1))
    with pytest.raises(ResumeMismatch, match=f"was saved with {named}"):
        check_layout(folder, run_layout(load_config(preset="tiny", overrides=[override]), world_size=1))


def test_settings_that_do_not_shape_the_weights_may_change_on_resume(tmp_path):
    folder = _saved(tmp_path, run_layout(load_config(preset="tiny"), world_size=1))
    changed = load_config(preset="tiny", overrides=["model.drop_path_rate=0.1", "model.grad_checkpointing=true",
                                                     "train.lr=1e-3", "moe.eval_noise=true"])
    check_layout(folder, run_layout(changed, world_size=1))


def test_another_zero_stage_or_precision_is_refused(tmp_path):
    formats = {name: engine_format(load_ds_config(REPO / "ds_configs" / f"{name}.json"))
               for name in ("zero0_fp32", "zero1_fp32", "zero1_bf16", "zero2_bf16")}
    assert formats["zero0_fp32"] == {"zero_stage": 0, "precision": "fp32"}
    assert formats["zero1_bf16"] == {"zero_stage": 1, "precision": "bf16"}
    folder = _saved(tmp_path, formats["zero1_fp32"])
    with pytest.raises(ResumeMismatch, match="precision='fp32', this run has 'bf16'"):
        check_layout(folder, formats["zero1_bf16"])
    with pytest.raises(ResumeMismatch, match="zero_stage=1, this run has 0"):
        check_layout(folder, formats["zero0_fp32"])


def test_starting_over_sets_the_earlier_runs_files_aside(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000040").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_00000040")
    (run / "tensorboard").mkdir()
    for name in ("metrics.jsonl", "config.yaml", "usage.json", LOCK_NAME, "notes.txt"):
        (run / name).write_text(name)
    aside = set_aside_earlier_run(run)
    assert aside is not None and aside.parent == run and aside.name.startswith("replaced-")
    assert sorted(p.name for p in aside.iterdir()) == sorted(
        ["checkpoints", "metrics.jsonl", "config.yaml", "usage.json", "tensorboard"])
    assert (aside / "checkpoints" / "latest").read_text() == "step_00000040"
    assert sorted(p.name for p in run.iterdir()) == sorted([LOCK_NAME, "notes.txt", aside.name])  # not its files
    assert set_aside_earlier_run(run) is None  # nothing trained there since
    assert LOCK_NAME not in RUN_OUTPUTS


def test_a_folder_without_an_earlier_run_is_left_alone(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)  # created, nothing saved
    (run / "config.yaml").write_text("x")
    assert set_aside_earlier_run(run) is None
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml"]


def test_evaluation_refuses_a_config_of_another_model_but_not_another_layout(tmp_path):
    from modsquad_ds.eval.checkpoints import check_architecture
    from modsquad_ds.train.checkpoint import CheckpointError

    folder = _saved(tmp_path, run_layout(load_config(preset="tiny", overrides=["train.ep_size=2"]), world_size=2))
    check_architecture(folder, load_config(preset="tiny", overrides=["data.batch_size=3"]))  # any world, ep, batch
    with pytest.raises(CheckpointError, match="holds a model with model.num_heads=4, the config asks for 2"):
        check_architecture(folder, load_config(preset="tiny", overrides=["model.num_heads=2"]))


def test_the_study_starts_a_run_over_when_its_budget_or_settings_changed(tmp_path):
    """Re-running the study with another --steps must not continue the earlier run: its learning-rate
    schedule was another, and its evaluation is not the new budget's."""
    from modsquad_ds.config.loader import save_config
    from modsquad_ds.study.runs import _settings_changed

    saved = tmp_path / "config.yaml"
    assert not _settings_changed(saved, load_config(preset="tiny"))  # no earlier run
    save_config(load_config(preset="tiny", overrides=["train.steps=20"]), saved)
    assert not _settings_changed(saved, load_config(preset="tiny", overrides=["train.steps=20"]))
    assert not _settings_changed(saved, load_config(preset="tiny", overrides=["train.steps=20", "train.resume=false"]))
    assert _settings_changed(saved, load_config(preset="tiny", overrides=["train.steps=30"]))
    assert _settings_changed(saved, load_config(preset="tiny", overrides=["train.steps=20", "train.lr=1e-3"]))


def test_a_run_that_logged_but_never_saved_is_set_aside_too(tmp_path):
    """A run stopped before its first checkpoint left metrics.jsonl only (an empty checkpoints
    folder): its log must not be appended to by the new run."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    aside = set_aside_earlier_run(run)
    assert aside is not None and sorted(p.name for p in aside.iterdir()) == ["checkpoints", "metrics.jsonl"]


def test_start_overs_within_one_second_get_distinct_folders(tmp_path):
    """replaced-{stamp} and replaced-{stamp}-1 already taken (two earlier start-overs this second, for
    this second and the next): the third gets -2 instead of failing or merging into one of them."""
    import time

    run = tmp_path / "run"
    run.mkdir()
    now = time.time()
    for t in (now, now + 1):
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(t))
        for name in (f"replaced-{stamp}", f"replaced-{stamp}-1"):
            (run / name).mkdir(exist_ok=True)
            (run / name / "metrics.jsonl").write_text("earlier")
    (run / "metrics.jsonl").write_text("this one")
    aside = set_aside_earlier_run(run)
    assert aside.name.endswith("-2") and (aside / "metrics.jsonl").read_text() == "this one"
    assert all((p / "metrics.jsonl").read_text() == "earlier" for p in run.iterdir() if p != aside)
