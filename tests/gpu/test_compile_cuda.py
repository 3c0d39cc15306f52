"""On CUDA, every transformer block compiles to one graph on the path sm90+ GPUs train (bf16, the
grouped expert kernel): the GPU twin of tests/unit/model/test_compile.py's graph test, run here on
the GPU machine's own torch (2.11, whose compiler broke each block 15-17 times before moe/amp.py)."""

import pytest
import torch
from _compiled_blocks import graph_breaks_per_block

from modsquad_ds.config.schema import installed_torch
from modsquad_ds.moe.kernels import grouped_supported


@pytest.mark.parametrize("params", ["fp32_autocast", "bf16"])
def test_every_block_compiles_to_one_graph_on_cuda(params):
    if installed_torch() < (2, 10):
        pytest.skip("model.compile needs torch >= 2.10")
    if not grouped_supported("cuda", torch.cuda.current_device(), torch.bfloat16):
        pytest.skip("the grouped kernel (sm90+, bf16) is the sync-free one; the loop reads the counts")
    assert not graph_breaks_per_block("cuda", "auto", params)
