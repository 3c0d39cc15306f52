"""The grouped expert kernel issues as many kernels for 16 experts as for 4: nothing per expert.

Issue 7's first GPU profile found the step launch-bound: the host issued ~1,000 matmuls and ~1,900
dtype casts per step (a cast per expert weight under autocast), and took twice as long to issue
the work as the GPU took to run it. Every aten op that computes is a launch on a GPU, so counting
them on the CPU finds a per-expert launch without a GPU (benchmarks/host_overhead.py counts a step).
Views are left out: they alias and launch nothing.
"""

import pytest
from _moe_launches import KINDS, kernels_of_a_step, moe_layer

from modsquad_ds.moe.kernels import has_grouped_mm

pytestmark = pytest.mark.skipif(not has_grouped_mm(), reason="needs torch.nn.functional.grouped_mm")


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("kind", KINDS)
def test_forward_and_backward_kernels_do_not_grow_with_the_number_of_experts(kind, autocast):
    few, many = kernels_of_a_step(moe_layer(kind, 4), autocast), kernels_of_a_step(moe_layer(kind, 16), autocast)
    assert few == many, f"ops that grew with the experts: {dict(many - few)}"
