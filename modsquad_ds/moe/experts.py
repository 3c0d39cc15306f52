"""Expert containers: each runs its experts over the contiguous, expert-sorted token chunks.

MLP experts are a ``ModuleList`` of timm ``Mlp`` indexed by global expert id, the shape DeepSpeed's
expert checkpoint files (``layer_{L}_expert_{E}``) map onto. Attention experts keep their query and
output projections stacked, since attention needs every token's keys and values and so cannot be
sharded by token dispatch.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import Mlp, trunc_normal_


def run_chunked(fns, x_SD: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Apply ``fns[e]`` to expert e's chunk of ``x_SD`` and concatenate, skipping empty experts."""
    outs = [fn(chunk) for fn, chunk, n in zip(fns, x_SD.split(counts), counts) if n > 0]
    if not outs:
        return x_SD.new_zeros(0, x_SD.shape[-1])
    return torch.cat(outs) if len(outs) > 1 else outs[0]


class MLPExperts(nn.Module):
    def __init__(self, dim: int, hidden: int, num_experts: int, act_layer=nn.GELU):
        super().__init__()
        self.experts = nn.ModuleList(Mlp(dim, hidden, act_layer=act_layer) for _ in range(num_experts))

    def forward(self, x_SD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        return run_chunked(self.experts, x_SD, counts)


class AttentionProjections(nn.Module):
    """Per-expert query (D -> h) and output (h -> D) projections, no bias (reference code)."""

    def __init__(self, dim: int, head_dim: int, num_experts: int):
        super().__init__()
        self.q_weight = nn.Parameter(torch.empty(num_experts, dim, head_dim))
        self.o_weight = nn.Parameter(torch.empty(num_experts, head_dim, dim))
        trunc_normal_(self.q_weight, std=0.02)
        trunc_normal_(self.o_weight, std=0.02)

    def query(self, x_SD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        return run_chunked(_right_multipliers(self.q_weight), x_SD, counts)

    def output(self, o_SH: torch.Tensor, counts: list[int]) -> torch.Tensor:
        return run_chunked(_right_multipliers(self.o_weight), o_SH, counts)


def _right_multipliers(weight_EIO: torch.Tensor):
    return [lambda chunk, w=w: chunk @ w for w in weight_EIO]
