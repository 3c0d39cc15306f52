"""Every shipped DeepSpeed JSON loads; overrides apply; refusals name the file and the key on one line."""

import json

import pytest

from modsquad_ds.config import ConfigError, load_config
from modsquad_ds.distributed.ds_config import (SHIPPED_DIR, apply_overrides, ds_config_for_run, load_ds_config,
                                        shipped_configs)

EXPECTED = {"zero0_fp32.json", "zero1_fp32.json", "zero1_bf16.json", "zero2_fp32.json", "zero2_bf16.json"}


def test_the_shipped_set():
    assert {p.name for p in shipped_configs()} == EXPECTED


@pytest.mark.parametrize("path", shipped_configs(), ids=lambda p: p.name)
def test_every_shipped_json_loads_and_is_world_size_independent(path):
    config = load_ds_config(path)
    assert "train_batch_size" not in config
    assert config["train_micro_batch_size_per_gpu"] >= 1 and config["gradient_accumulation_steps"] >= 1
    assert config["gradient_clipping"] > 0
    stage = int(path.name[4])
    assert config["zero_optimization"]["stage"] == stage
    assert config["bf16"]["enabled"] == ("bf16" in path.name)
    assert "optimizer" not in config and "scheduler" not in config


def test_relative_path_resolves_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_ds_config("ds_configs/zero1_fp32.json")["zero_optimization"]["stage"] == 1


def test_overrides_from_the_run_config():
    cfg = load_config(overrides=["train.ds_config=ds_configs/zero1_fp32.json", "data.batch_size=5",
                                 "train.grad_accum=4", "train.grad_clip=0.5", "train.precision=bf16",
                                 "train.zero_stage=2"])
    config = ds_config_for_run(cfg)
    assert config["train_micro_batch_size_per_gpu"] == 5
    assert config["gradient_accumulation_steps"] == 4
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"]["enabled"] is True
    assert config["zero_optimization"]["stage"] == 2
    assert config["zero_optimization"]["contiguous_gradients"] is True  # the rest of the file kept


def test_unset_overrides_keep_the_file():
    on_disk = json.loads((SHIPPED_DIR / "zero2_bf16.json").read_text())
    assert apply_overrides(on_disk) == on_disk


def write(tmp_path, **config):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, **config}))
    return path


@pytest.mark.parametrize("config, key, text", [
    (dict(train_batch_size=64), "train_batch_size", "must not be set: it fixes the world size"),
    (dict(optimizer={"type": "Adam"}), "optimizer", "the trainer builds AdamW"),
    (dict(scheduler={"type": "WarmupLR"}), "scheduler", "train.warmup_steps"),
    (dict(zero_optimization={"stage": 3}), "zero_optimization.stage",
     "Native DeepSpeed MoE is not supported with ZeRO Stage 3"),
    (dict(zero_optimization={"stage": 5}), "zero_optimization.stage", "must be 0, 1 or 2"),
    (dict(zero_optimization={"stage": True}), "zero_optimization.stage", "must be 0, 1 or 2, got True"),  # == 1
    (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps", "integer >= 1"),
    (dict(gradient_clipping=-1), "gradient_clipping", ">= 0"),
    (dict(fp16={"enabled": True}), "fp16.enabled", "fp16 is not supported"),
    (dict(bf16={"enabled": True}, gradient_clipping=1.0), "zero_optimization.stage",
     "leaves expert gradients out of the clipping norm"),
])
def test_refusals_name_file_and_key(tmp_path, config, key, text):
    path = write(tmp_path, **config)
    with pytest.raises(ConfigError) as err:
        load_ds_config(path)
    assert err.value.key == f"{path}:{key}" and text in err.value.message
    assert "\n" not in str(err.value)


def test_bf16_stage0_without_clipping_or_moe_is_allowed(tmp_path):
    path = write(tmp_path, bf16={"enabled": True}, gradient_clipping=0.0)
    assert load_ds_config(path)["bf16"]["enabled"]
    path = write(tmp_path, bf16={"enabled": True}, gradient_clipping=1.0)
    assert load_ds_config(path, moe=False)["gradient_clipping"] == 1.0


def test_missing_micro_batch(tmp_path):
    path = tmp_path / "m.json"
    path.write_text("{}")
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu: is required"):
        load_ds_config(path)


def test_override_that_breaks_a_good_file_is_refused():
    with pytest.raises(ConfigError, match="with overrides:zero_optimization.stage: bf16 at ZeRO stage 0"):
        load_ds_config("ds_configs/zero0_fp32.json", precision="bf16")


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="train.ds_config: file not found"):
        load_ds_config(tmp_path / "nope.json")
    bad = tmp_path / "b.json"
    bad.write_text("{,}")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_ds_config(bad)


def test_precision_override_keeps_the_files_other_bf16_settings(tmp_path):
    path = write(tmp_path, zero_optimization={"stage": 1}, bf16={"enabled": False, "immediate_grad_update": True})
    assert load_ds_config(path, precision="bf16")["bf16"] == {"enabled": True, "immediate_grad_update": True}
