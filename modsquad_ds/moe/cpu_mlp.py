"""The MoE MLP on a CPU: dispatch, experts and combine in one pass, expert by expert.

The general path (moe/experts.py) materialises every stage over all ``S = N*K`` slots: the gathered
token copies, each projection's output, the combine's gradient rows and its gate products, each an
``(S, D)`` or ``(S, hidden)`` tensor (25 MB at ViT-S shapes with 4 tasks of 1,024 tokens) written,
read back from memory and, being fresh, often page-faulted in again. Here each expert takes its
tokens (a gather into a reused buffer of a few MB), runs fc1, GELU and fc2 while they are in cache,
and, in backward, gathers its rows of the output gradient, takes its gates' gradients, scales by
the gates and runs its own backward on them, all on the same chunk. Only the fc1 outputs are kept
(for the GELU's backward; the GELU itself is recomputed); not the expert outputs (the gates'
gradient comes from the GELU's output instead, see backward) nor a copy of the tokens (gathered
again in backward); and the experts' parameters are used as they are, not stacked into a copy. Same
math as the general path, to float rounding.

Only where it pays: on the CPU (a GPU's L2 holds a whole stage anyway, and per-expert launches
would cost more than they save), without autocast, for timm ``Mlp`` experts whose norm is the
identity and whose dropouts are off (the model's experts: ``Mlp`` defaults).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from timm.layers import Mlp

from modsquad_ds.moe.dispatch import DispatchPlan, sum_slots


def fusable(expert: Mlp, x: torch.Tensor) -> bool:
    """True where :func:`moe_mlp` computes what ``expert``'s modules would, and pays."""
    return (x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
            and type(expert.act) is nn.GELU and isinstance(expert.norm, nn.Identity)
            and expert.fc1.bias is not None and expert.fc2.bias is not None
            and all(not d.training or d.p == 0 for d in (expert.drop1, expert.drop2)))


def moe_mlp(experts: Sequence[Mlp], x_ND: torch.Tensor, p: DispatchPlan) -> torch.Tensor:
    """(N, D) tokens through their chosen experts' MLPs, summed by gate (paper eq. 1)."""
    params = [t for m in experts for t in (m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias)]
    return _MoEMlp.apply(x_ND, p.gates, p.token_idx, p.inverse, p.counts, p.top_k, experts[0].act.approximate,
                         *params)


class _MoEMlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, gates_S, token_idx_S, inverse_S, counts, k, approximate, *params):
        h_SH = x_ND.new_empty(len(token_idx_S), params[0].shape[0])  # fc1 outputs, kept for backward
        y_SO = x_ND.new_empty(len(token_idx_S), params[2].shape[0])  # expert outputs, until combined
        x_buf = x_ND.new_empty(max(counts), x_ND.shape[1])
        a_buf = h_SH.new_empty(max(counts), h_SH.shape[1])
        for e, (n, idx, h, y) in enumerate(zip(counts, *_by_expert(counts, token_idx_S, h_SH, y_SO))):
            if n:
                w1, b1, w2, b2 = params[4 * e:4 * e + 4]
                x = torch.index_select(x_ND, 0, idx, out=x_buf[:n])
                # mm, then the bias in place: addmm into a slice of a fresh buffer cost more on CPU
                torch.mm(x, w1.t(), out=h).add_(b1)
                torch.mm(_gelu(h, approximate, a_buf[:n]), w2.t(), out=y).add_(b2)
        want_params = any(ctx.needs_input_grad[7:])  # not when only routers and heads train (new tasks)
        # the tokens only for fc1's weight gradient (gathered again in backward)
        ctx.save_for_backward(x_ND if want_params else None, gates_S, token_idx_S, inverse_S, h_SH, *params)
        ctx.in_features = x_ND.shape[1]
        ctx.counts, ctx.approximate, ctx.k = counts, approximate, k
        return sum_slots(y_SO, inverse_S, k, gates_S[inverse_S])  # each token's K outputs by gate, as combine

    @staticmethod
    def backward(ctx, grad_ND):
        x_ND, gates_S, token_idx_S, inverse_S, h_SH, *params = ctx.saved_tensors
        counts, approximate = ctx.counts, ctx.approximate
        grad_ND = grad_ND.contiguous()
        grad_x_SD = grad_ND.new_empty(len(token_idx_S), ctx.in_features)  # each slot's input gradient
        grad_gates_S = h_SH.new_empty(gates_S.shape)  # in the activations' dtype, as combine's backward
        gates_S1 = gates_S.to(h_SH.dtype).unsqueeze(1)
        chunks = _by_expert(counts, token_idx_S, gates_S1, h_SH, grad_x_SD, grad_gates_S)
        want_params = x_ND is not None
        most = max(counts)  # the busiest expert's rows: the work buffers every expert reuses
        g_buf = grad_ND.new_empty(most, grad_ND.shape[1])
        u_buf, a_buf = (h_SH.new_empty(most, h_SH.shape[1]) for _ in range(2))
        x_buf = x_ND.new_empty(most, x_ND.shape[1]) if want_params else None  # tokens, gathered again
        grads = []
        for e, (n, idx, gate, h, grad_x, grad_gate) in enumerate(zip(counts, *chunks)):
            w1, b1, w2, b2 = params[4 * e:4 * e + 4]
            if not n:  # an expert without tokens
                grads += [torch.zeros_like(t) if want_params else None for t in (w1, b1, w2, b2)]
                continue
            g = torch.index_select(grad_ND, 0, idx, out=g_buf[:n])  # the combine's backward, this expert's rows
            u = torch.mm(g, w2, out=u_buf[:n])  # the gradient at the GELU's output, before the gate
            a = _gelu(h, approximate, a_buf[:n])  # the GELU's output again
            # The gate's gradient <g, y> as <g, a w2^T + b2> = <u, a> + <g, b2>: from rows in cache, so
            # the expert outputs y need not be kept for backward nor read back from memory.
            torch.linalg.vecdot(u, a, out=grad_gate).addmv_(g, b2)
            g_h = torch.ops.aten.gelu_backward.grad_input(u.mul_(gate), h, approximate=approximate, grad_input=u)
            torch.mm(g_h, w1, out=grad_x)
            if want_params:
                g.mul_(gate)
                g_w1 = g_h.t() @ torch.index_select(x_ND, 0, idx, out=x_buf[:n])
                grads += [g_w1, g_h.sum(0), g.t() @ a, g.sum(0)]
            else:
                grads += [None] * 4
        grad_x_ND = sum_slots(grad_x_SD, inverse_S, ctx.k)  # each token's K slots, as dispatch's backward
        return grad_x_ND, grad_gates_S.to(gates_S.dtype), None, None, None, None, None, *grads


def _gelu(h: torch.Tensor, approximate: str, out: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu.out(h, approximate=approximate, out=out)


def _by_expert(counts: list[int], *tensors: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Each expert-sorted tensor split into its experts' rows (views)."""
    return [t.split(counts) for t in tensors]
