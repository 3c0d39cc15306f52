"""The train section: defaults resolve, bad values are refused with the dotted key."""

import pytest

from modsquad_ds.config import ConfigError, load_config


def test_defaults():
    t = load_config().train
    assert t.ds_config == "ds_configs/zero0_fp32.json" and t.ep_size == 1
    assert t.zero_stage is None and t.precision is None and t.grad_accum is None and t.grad_clip is None


def test_overrides_parse():
    t = load_config(overrides=["train.precision=bf16", "train.zero_stage=2", "train.grad_accum=4",
                               "train.grad_clip=0.5", "train.ep_size=2", "train.steps=10",
                               "train.warmup_steps=2"]).train
    assert (t.precision, t.zero_stage, t.grad_accum, t.grad_clip, t.ep_size) == ("bf16", 2, 4, 0.5, 2)


@pytest.mark.parametrize("override, message", [
    ("train.zero_stage=3", "train.zero_stage: 3 is refused: Native DeepSpeed MoE is not supported with ZeRO Stage 3"),
    ("train.zero_stage=7", "train.zero_stage: must be 0, 1 or 2"),
    ("train.precision=fp16", "train.precision: must be one of fp32, bf16"),
    ("train.grad_accum=0", "train.grad_accum: must be >= 1"),
    ("train.grad_clip=-1", "train.grad_clip: must be >= 0"),
    ("train.ep_size=0", "train.ep_size: must be >= 1"),
    ("train.warmup_steps=500", "train.warmup_steps: must be in [0, train.steps (100)], got 500; for a run this "
                               "short add --set train.warmup_steps=50"),
    ("train.heartbeat_timeout_s=-1", "train.heartbeat_timeout_s: must be >= 0"),
    ("train.dist_timeout_s=0", "train.dist_timeout_s: must be positive"),
    ("train.nonfinite_patience=0", "train.nonfinite_patience: must be >= 1"),
    ("train.bogus=1", "train.bogus: unknown key"),
])
def test_refusals(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert message in str(err.value)
