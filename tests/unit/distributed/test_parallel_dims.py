"""ParallelDims: derived sizes and refusals that name the key, without any process."""

import pytest

from modsquad_ds.config import ConfigError, load_config
from modsquad_ds.distributed.ds_config import ds_config_for_run
from modsquad_ds.distributed.parallel import ParallelDims


def test_derived_sizes():
    dims = ParallelDims(world_size=8, ep_size=4, num_experts=16, micro_batch=2, grad_accum=3)
    assert (dims.dp_size, dims.expert_dp_size, dims.local_experts, dims.global_batch) == (8, 2, 4, 48)


@pytest.mark.parametrize("kwargs, key, text", [
    (dict(world_size=4, ep_size=3, num_experts=6), "train.ep_size", "must divide the world size (4 ranks)"),
    (dict(world_size=4, ep_size=4, num_experts=6), "train.ep_size", "must divide moe.mlp.num_experts (6)"),
    (dict(world_size=1, ep_size=2, num_experts=2), "train.ep_size", "must divide the world size (1 ranks)"),
    (dict(world_size=2, ep_size=0), "train.ep_size", "must be >= 1"),
    (dict(world_size=2, micro_batch=0), "data.batch_size", "must be >= 1"),
    (dict(world_size=2, grad_accum=0), "train.grad_accum", "must be >= 1"),
    (dict(world_size=2, zero_stage=3), "train.zero_stage",
     "Native DeepSpeed MoE is not supported with ZeRO Stage 3"),
    (dict(world_size=2, zero_stage=4), "train.zero_stage", "must be 0, 1 or 2"),
    (dict(world_size=2, precision="fp16"), "train.precision", "must be fp32 or bf16"),
])
def test_refusals_name_the_key(kwargs, key, text):
    with pytest.raises(ConfigError) as err:
        ParallelDims(**kwargs)
    assert err.value.key == key and text in err.value.message
    assert "\n" not in str(err.value)


def test_from_config_uses_resolved_ds_config():
    cfg = load_config(overrides=["train.ep_size=2", "moe.mlp.num_experts=8", "train.ds_config=ds_configs/zero2_bf16.json",
                                 "train.grad_accum=4", "data.batch_size=3"])
    dims = ParallelDims.from_config(cfg, world_size=4, ds_config=ds_config_for_run(cfg))
    assert (dims.zero_stage, dims.precision, dims.grad_accum, dims.micro_batch) == (2, "bf16", 4, 3)
    assert (dims.local_experts, dims.expert_dp_size) == (4, 2)


def test_from_config_refuses_ep_without_mlp_experts():
    cfg = load_config(overrides=["train.ep_size=2", "moe.mlp.enabled=false"])
    with pytest.raises(ConfigError, match="train.ep_size: \\(2\\) must be 1 when moe.mlp.enabled is false"):
        ParallelDims.from_config(cfg, world_size=2)


def test_from_config_takes_micro_batch_and_accumulation_from_the_ds_config_given():
    """A run's ds_config may set them itself; without an MoE MLP there is one "expert" per layer."""
    cfg = load_config(overrides=["data.batch_size=3", "moe.mlp.enabled=false", "moe.mlp.num_experts=8"])
    dims = ParallelDims.from_config(cfg, world_size=4, ds_config={"train_micro_batch_size_per_gpu": 5,
                                                                  "gradient_accumulation_steps": 2})
    assert (dims.micro_batch, dims.grad_accum, dims.global_batch) == (5, 2, 40)
    assert (dims.num_experts, dims.local_experts, dims.expert_dp_size) == (1, 1, 4)
