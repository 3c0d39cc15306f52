"""On CUDA, an MoE layer's forward and backward launch as many kernels for 16 experts as for 4: the
GPU twin of tests/unit/moe/test_launches.py, with the grouped kernel as sm90+ runs it in bf16
(fp32 parameters under autocast, and bf16 parameters as DeepSpeed's bf16 engines hold them)."""

import pytest
import torch
from _moe_launches import KINDS, kernels_of_a_step, moe_layer

from modsquad_ds.moe.kernels import grouped_supported


@pytest.mark.parametrize("params", ["fp32_autocast", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_kernels_do_not_grow_with_the_number_of_experts(kind, params):
    if not grouped_supported("cuda", torch.cuda.current_device(), torch.bfloat16):
        pytest.skip("grouped_mm's fused kernel needs sm90+ (the loop kernel launches per expert by design)")
    autocast = params == "fp32_autocast"

    def on_gpu(num_experts):
        layer = moe_layer(kind, num_experts).cuda()
        return layer if autocast else layer.to(torch.bfloat16)

    few, many = kernels_of_a_step(on_gpu(4), autocast), kernels_of_a_step(on_gpu(16), autocast)
    assert few == many, f"ops that grew with the experts: {dict(many - few)}"
    assert many["_grouped_mm"] > 0  # the fused kernel ran
