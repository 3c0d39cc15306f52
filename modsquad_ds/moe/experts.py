"""Expert containers: each runs its experts over the contiguous, expert-sorted token rows.

MLP experts are a ``ModuleList`` of timm ``Mlp`` indexed by global expert id, the shape DeepSpeed's
expert checkpoint files (``layer_{L}_expert_{E}``) map onto. Attention experts keep their query and
output projections stacked, since attention needs every token's keys and values and so cannot be
sharded by token dispatch.

Every expert projection goes through :func:`expert_linear`, on the experts' weights stacked into one
``(E, out, in)`` tensor: the MLP experts' ``nn.Linear`` weights are stacked on the fly (E*I*O copied
per call, small beside the matmul, so parameter names and shapes stay as they are), the attention
projections are a transposed view. One stack and, under autocast, one cast per projection, where a
cast per expert weight had made dtype casts the most launched op of a bf16 step. Two kernels
(moe/kernels.py chooses) compute the same thing:

- ``loop``: one matmul per expert chunk, written straight into one output buffer (and, in backward,
  into one input-gradient and one stacked weight-gradient buffer): no ``torch.cat`` of per-expert
  outputs forward or backward, which cost as much as a fifth of the layer on CPU (two extra copies
  of every activation, each a fresh allocation). Needs the counts on the host.
- ``grouped``: one ``grouped_mm`` over all rows with the plan's on-device offsets.

The activation and dropout run once on the whole ``(S, H)`` tensor (the experts share them). On the
CPU the loop kernel's MoE MLP instead runs dispatch, experts and combine expert by expert, on the
experts' own parameters (moe/cpu_mlp.py).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_

from modsquad_ds.moe import cpu_mlp, kernels
from modsquad_ds.moe.amp import autocast_enabled
from modsquad_ds.moe.dispatch import DispatchPlan, combine, dispatch


class _LoopLinear(torch.autograd.Function):
    """``y[rows of e] = x[rows of e] @ w[e].T (+ b[e])`` expert by expert, into preallocated buffers.

    Backward writes every expert's weight (and bias) gradient into one stacked buffer laid out like
    the stacked weight, so the stack's backward hands each parameter a view it can keep as is.
    """

    @staticmethod
    def forward(ctx, x_SI: torch.Tensor, counts: list[int], w_EOI: torch.Tensor, b_EO: torch.Tensor | None):
        y = x_SI.new_empty(x_SI.shape[0], w_EOI.shape[1])
        lo = 0
        for e, n in enumerate(counts):
            if n:
                torch.mm(x_SI[lo:lo + n], w_EOI[e].t(), out=y[lo:lo + n])
                if b_EO is not None:  # not addmm: into a slice of a fresh buffer it cost 20% more on CPU
                    y[lo:lo + n] += b_EO[e]
            lo += n
        # the input only for the weights' gradient: with frozen experts (router fine-tuning) it is not kept
        ctx.save_for_backward(x_SI if ctx.needs_input_grad[2] else None, w_EOI)
        ctx.counts, ctx.has_bias = counts, b_EO is not None
        return y

    @staticmethod
    def backward(ctx, grad_SO: torch.Tensor):
        x_SI, w_EOI = ctx.saved_tensors
        grad_SO = grad_SO.contiguous()
        grad_x = grad_SO.new_empty(grad_SO.shape[0], w_EOI.shape[2]) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty_like(w_EOI) if ctx.needs_input_grad[2] else None  # w's strides: a view stays one
        grad_b = grad_SO.new_empty(w_EOI.shape[:2]) if ctx.has_bias and ctx.needs_input_grad[3] else None
        lo = 0
        for e, n in enumerate(ctx.counts):
            g = grad_SO[lo:lo + n]
            if grad_x is not None and n:
                torch.mm(g, w_EOI[e], out=grad_x[lo:lo + n])
            if grad_w is not None:
                if n:
                    torch.mm(g.t(), x_SI[lo:lo + n], out=grad_w[e])
                else:
                    grad_w[e].zero_()  # an expert without tokens
            if grad_b is not None:
                torch.sum(g, 0, out=grad_b[e])  # zeros for an expert without tokens
            lo += n
        return grad_x, None, grad_w, grad_b


def expert_linear(x_SI: torch.Tensor, p: DispatchPlan, w_EOI: torch.Tensor, b_EO: torch.Tensor | None = None,
                  kernel: str = "auto") -> torch.Tensor:
    """Row s of ``x_SI`` through expert e's ``nn.Linear``: ``x_s @ w_EOI[e].T (+ b_EO[e])``, e the expert
    of row s, rows sorted by expert. ``w_EOI`` stacks the experts' weights in ``nn.Linear``'s
    (out, in) layout; a transposed view of an (E, in, out) parameter does too, without a copy."""
    device_type = x_SI.device.type
    if autocast_enabled(device_type):
        # Autocast does not reach inside a custom autograd Function, nor grouped_mm: cast here as it
        # would cast a matmul (inputs and weights to the autocast dtype; the casts are differentiable).
        # One cast of the stacked weights, not one per expert: a step used to launch ~1,500 casts.
        dtype = torch.get_autocast_dtype(device_type)
        b_EO = None if b_EO is None else b_EO.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return expert_linear(x_SI.to(dtype), p, w_EOI.to(dtype), b_EO, kernel)
    if kernels.resolve(kernel, x_SI, w_EOI.shape[1]) == "grouped":
        y = F.grouped_mm(x_SI, w_EOI.transpose(1, 2), offs=p.offsets_E)
        if b_EO is not None:
            # one_hot @ bias, not bias[expert_S]: its gradient is a matmul, not index_add atomics
            y = y + F.one_hot(p.expert_S, w_EOI.shape[0]).to(y.dtype) @ b_EO
        return y
    return _LoopLinear.apply(x_SI, p.counts, w_EOI, b_EO)


def moe_mlp(experts: Sequence[Mlp], x_ND: torch.Tensor, p: DispatchPlan, kernel: str = "auto") -> torch.Tensor:
    """(N, D) tokens through their chosen experts' timm ``Mlp``, summed by gate (paper eq. 1)."""
    if kernels.resolve(kernel, x_ND) == "loop" and cpu_mlp.fusable(experts[0], x_ND):
        return cpu_mlp.moe_mlp(experts, x_ND, p)  # dispatch, experts and combine, expert by expert
    return combine(run_mlp_experts(experts, dispatch(x_ND, p), p, kernel), p)


def run_mlp_experts(experts: Sequence[Mlp], x_SD: torch.Tensor, p: DispatchPlan, kernel: str = "auto") -> torch.Tensor:
    """Expert e's timm ``Mlp`` on its rows of the expert-sorted ``x_SD``, all experts at once."""
    first = experts[0]  # the activation, dropout and (identity) norm are the same in every expert
    w1, b1, w2, b2 = (_stacked(experts, linear, param) for linear in ("fc1", "fc2") for param in ("weight", "bias"))
    h = first.norm(first.drop1(first.act(expert_linear(x_SD, p, w1, b1, kernel))))
    return first.drop2(expert_linear(h, p, w2, b2, kernel))


def _stacked(experts: Sequence[Mlp], linear: str, param: str) -> torch.Tensor | None:
    """The experts' ``linear.param`` stacked on a new first dim (one copy; its backward hands each
    parameter a contiguous view of the stacked gradient)."""
    tensors = [getattr(getattr(m, linear), param) for m in experts]
    return None if tensors[0] is None else torch.stack(tensors)


class MLPExperts(kernels.KernelChoice, nn.Module):
    def __init__(self, dim: int, hidden: int, num_experts: int, act_layer=nn.GELU):
        super().__init__()
        self.experts = nn.ModuleList(Mlp(dim, hidden, act_layer=act_layer) for _ in range(num_experts))

    def forward(self, x_ND: torch.Tensor, p: DispatchPlan) -> torch.Tensor:
        """(N, D) tokens through their chosen experts, summed by gate."""
        return moe_mlp(self.experts, x_ND, p, self.kernel)


class AttentionProjections(kernels.KernelChoice, nn.Module):
    """Per-expert query (D -> h) and output (h -> D) projections, no bias (reference code)."""

    def __init__(self, dim: int, head_dim: int, num_experts: int):
        super().__init__()
        self.q_weight = nn.Parameter(torch.empty(num_experts, dim, head_dim))
        self.o_weight = nn.Parameter(torch.empty(num_experts, head_dim, dim))
        trunc_normal_(self.q_weight, std=0.02)
        trunc_normal_(self.o_weight, std=0.02)

    def query(self, x_SD: torch.Tensor, p: DispatchPlan) -> torch.Tensor:
        return expert_linear(x_SD, p, self.q_weight.transpose(1, 2), None, self.kernel)

    def output(self, o_SH: torch.Tensor, p: DispatchPlan) -> torch.Tensor:
        return expert_linear(o_SH, p, self.o_weight.transpose(1, 2), None, self.kernel)
