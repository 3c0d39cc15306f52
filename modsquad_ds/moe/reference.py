"""Slow, obviously correct MoE layers: every expert on every token, masked by a dense gate matrix.

These are paper eq. 1 written literally, ``y = sum_e G_e(x) E_e(x)`` with ``G`` zero outside each
token's top-k. They share parameters with the fast layers (they take one as argument), so tests can
compare outputs and gradients of the two paths on the very same weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from modsquad_ds.moe.attention import MoEAttention
from modsquad_ds.moe.layer import MoEMlp
from modsquad_ds.moe.router import RoutingResult, TaskRouter


def reference_route(router: TaskRouter, x_TSD: torch.Tensor, task_ids_T: torch.Tensor) -> RoutingResult:
    """Paper eq. 2 one task slot at a time. Draws its noise exactly as the fast router does, so
    under the same RNG seed both see the same noise."""
    logits = torch.stack([x_TSD[i].float() @ router.task_wg[task] for i, task in enumerate(task_ids_T.tolist())])
    if router.task_wnoise is not None and router.training:
        std = torch.stack([F.softplus(x_TSD[i].float() @ router.task_wnoise[task])
                           for i, task in enumerate(task_ids_T.tolist())])
        logits = logits + torch.randn_like(logits) * (std + router.noise_epsilon)
    probs = F.softmax(logits, dim=-1)
    gates, ids = torch.topk(probs, router.top_k, dim=-1)
    return RoutingResult(logits, probs, ids, gates)


def dense_gates(r: RoutingResult) -> torch.Tensor:
    """(T, S, E) gate matrix: the router's probability at the top-k experts, 0 elsewhere."""
    g = torch.zeros_like(r.probs_TSE)
    return g.scatter(-1, r.topk_ids_TSK, r.gates_TSK)


def reference_moe_mlp(layer: MoEMlp, x_TBND: torch.Tensor, task_ids_T: torch.Tensor) -> torch.Tensor:
    t, b, n, d = x_TBND.shape
    x_TSD = x_TBND.reshape(t, b * n, d)
    g_TSE = dense_gates(reference_route(layer.router, x_TSD, task_ids_T)).to(x_TBND.dtype)
    y = torch.zeros_like(x_TSD)
    for e, expert in enumerate(layer.experts.experts):
        y = y + g_TSE[..., e:e + 1] * expert(x_TSD)
    return y.view(t, b, n, d)


def reference_moe_attention(layer: MoEAttention, x_TBND: torch.Tensor, task_ids_T: torch.Tensor) -> torch.Tensor:
    t, b, n, d = x_TBND.shape
    h = layer.head_dim
    routing = reference_route(layer.router, x_TBND.reshape(t, b * n, d), task_ids_T)
    g_TBNE = dense_gates(routing).view(t, b, n, -1).to(x_TBND.dtype)
    key, value = layer.kv(x_TBND).split(h, dim=-1)  # (T, B, N, h) each
    y = torch.zeros_like(x_TBND)
    for e in range(layer.num_experts):
        q = x_TBND @ layer.heads.q_weight[e]
        attn = F.softmax(q @ key.transpose(-1, -2) / h**0.5, dim=-1)
        y = y + g_TBNE[..., e:e + 1] * ((attn @ value) @ layer.heads.o_weight[e])
    return y
