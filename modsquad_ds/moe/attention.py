"""Mixture of attention heads (MoA, Zhang et al. 2022; paper Sec. 3.2).

Each token picks its top-k attention heads ("experts") with its task's router. Expert e owns a
query projection W_q[e] (D -> h) and an output projection W_o[e] (h -> D); all experts share one
single-head key/value projection (D -> 2h), so keys and values are computed once per token. A
token's output is the gate-weighted sum over its chosen heads of
``softmax(q_e K^T / sqrt(h)) V W_o[e]``.

Implementation: the ``N*K`` (token, head) query slots are projected expert by expert on contiguous
chunks, then all slots of one image attend to that image's keys in one multi-query
``scaled_dot_product_attention`` call, then the output projections run per expert again.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from modsquad_ds.moe import dispatch as dsp
from modsquad_ds.moe.experts import AttentionProjections
from modsquad_ds.moe.router import TaskRouter
from modsquad_ds.moe.stats import RoutingStats, routing_stats


class MoEAttention(nn.Module):
    kind = "attn"

    def __init__(self, dim: int, head_dim: int, num_experts: int, top_k: int, num_tasks: int,
                 noisy: bool = True, noise_epsilon: float = 1e-2, kv_bias: bool = True):
        super().__init__()
        self.num_experts = num_experts
        self.head_dim = head_dim
        self.router = TaskRouter(dim, num_experts, top_k, num_tasks, noisy, noise_epsilon)
        self.heads = AttentionProjections(dim, head_dim, num_experts)
        self.kv = nn.Linear(dim, 2 * head_dim, bias=kv_bias)
        self.name = "attn"

    def forward(self, x_TBND: torch.Tensor, task_ids_T: torch.Tensor) -> tuple[torch.Tensor, RoutingStats]:
        t, b, n, d = x_TBND.shape
        k = self.router.top_k
        x_TSD = x_TBND.reshape(t, b * n, d)
        r = self.router(x_TSD, task_ids_T)
        p = dsp.plan(r.topk_ids_TSK.reshape(t * b * n, k), r.gates_TSK.reshape(t * b * n, k), self.num_experts)

        q_sorted = self.heads.query(dsp.dispatch(x_TSD.reshape(-1, d), p), p)
        q = dsp.unpermute(q_sorted, p).view(t * b, 1, n * k, self.head_dim)
        key, value = self.kv(x_TBND).view(t * b, 1, n, 2 * self.head_dim).chunk(2, dim=-1)
        o = F.scaled_dot_product_attention(q, key, value)  # (TB, 1, N*K, h): all heads share K, V

        o_sorted = dsp.permute(o.reshape(t * b * n * k, self.head_dim), p)
        y = dsp.combine(self.heads.output(o_sorted, p), p).view(t, b, n, d)
        stats = routing_stats(self.name, self.kind, r.probs_TSE, r.topk_ids_TSK, task_ids_T, self.router.num_tasks)
        return y, stats
