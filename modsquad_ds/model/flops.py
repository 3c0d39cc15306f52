"""Parameter and FLOP counts, measured by running the model under torch's FlopCounterMode.

Counting the executed matmuls (rather than a formula) gives the true *active* FLOPs of the MoE
layers: only routed tokens reach an expert. Figures use the paper's convention (fvcore's, as in
Table 2): one multiply-add counts as one FLOP, i.e. half of torch's count.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils import flop_counter

_aten = torch.ops.aten


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # torch registers flash/efficient SDPA but not the kernel that CPU runs dispatch to.
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


CUSTOM_FLOPS = {_aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def forward_macs(model: nn.Module, images: torch.Tensor, tasks=None) -> int:
    """Multiply-adds of one eval-mode forward of ``model(images, tasks)``."""
    was_training = model.training
    model.eval()
    try:
        with flop_counter.FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS) as counter:
            model(images, tasks)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
