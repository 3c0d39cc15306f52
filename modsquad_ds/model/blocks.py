"""A pre-norm transformer block whose attention and MLP are either dense timm layers or MoE layers.

All sublayers share one calling convention, ``(x_TBND, task_ids_T) -> (y, stats | None)``, so a block
does not care which kind it holds. Dense sublayers fold the task dimension into the batch.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.layers import Attention, DropPath, Mlp

from modsquad_ds.moe.stats import RoutingStats


class DenseAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, head_dim: Optional[int] = None):
        super().__init__()
        # head_dim None: dim / num_heads; the authors' odd blocks use 2 * dim / num_heads
        self.attn = Attention(dim, num_heads=num_heads, attn_head_dim=head_dim, qkv_bias=qkv_bias)

    def forward(self, x_TBND, task_ids_T=None):
        t, b, n, d = x_TBND.shape
        return self.attn(x_TBND.reshape(t * b, n, d)).view(t, b, n, d), None


class DenseMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.mlp = Mlp(dim, hidden, act_layer=nn.GELU)

    def forward(self, x_TBND, task_ids_T=None):
        return self.mlp(x_TBND), None


class Block(nn.Module):
    def __init__(self, dim: int, attn: nn.Module, mlp: nn.Module, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = mlp
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x_TBND: torch.Tensor, task_ids_T: Optional[torch.Tensor]
                ) -> tuple[torch.Tensor, list[RoutingStats]]:
        y, attn_stats = self.attn(self.norm1(x_TBND), task_ids_T)
        x_TBND = x_TBND + self.drop_path(y)
        y, mlp_stats = self.mlp(self.norm2(x_TBND), task_ids_T)
        x_TBND = x_TBND + self.drop_path(y)
        return x_TBND, [s for s in (attn_stats, mlp_stats) if s is not None]
