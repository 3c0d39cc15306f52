"""Expert containers: each runs its experts over the contiguous, expert-sorted token rows.

MLP experts are a ``ModuleList`` of timm ``Mlp`` indexed by global expert id, the shape DeepSpeed's
expert checkpoint files (``layer_{L}_expert_{E}``) map onto. Attention experts keep their query and
output projections stacked, since attention needs every token's keys and values and so cannot be
sharded by token dispatch.

Every expert projection goes through :func:`expert_linear`, which runs one of two kernels
(moe/kernels.py chooses) that compute the same thing:

- ``loop``: one matmul per expert chunk, written straight into one output buffer (and, in backward,
  into one input-gradient buffer): no ``torch.cat`` of per-expert outputs forward or backward, which
  cost as much as a fifth of the layer on CPU (two extra copies of every activation, each a fresh
  allocation). Needs the counts on the host.
- ``grouped``: one ``grouped_mm`` over all rows with the plan's on-device offsets; the weights of the
  per-expert ``nn.Linear`` modules are stacked on the fly (E*I*O copied per call, small beside the
  matmul), so parameter names and shapes stay as they are.

Activations, dropout and the bias run once on the whole ``(S, H)`` tensor: the experts share them.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_

from modsquad_ds.moe import kernels
from modsquad_ds.moe.dispatch import DispatchPlan


def run_chunked(fns, x_SD: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Apply ``fns[e]`` to expert e's chunk of ``x_SD`` and concatenate, skipping empty experts."""
    outs = [fn(chunk) for fn, chunk, n in zip(fns, x_SD.split(counts), counts) if n > 0]
    if not outs:
        return x_SD.new_zeros(0, x_SD.shape[-1])
    return torch.cat(outs) if len(outs) > 1 else outs[0]


class _LoopLinear(torch.autograd.Function):
    """``y[rows of e] = x[rows of e] @ w[e] (+ b[e])`` expert by expert, into preallocated buffers."""

    @staticmethod
    def forward(ctx, x_SI: torch.Tensor, counts: list[int], has_bias: bool, *params: torch.Tensor):
        e = len(counts)
        ws, bs = params[:e], (params[e:] if has_bias else (None,) * e)
        y = x_SI.new_empty(x_SI.shape[0], ws[0].shape[1])
        lo = 0
        for w, b, n in zip(ws, bs, counts):
            if n:
                if b is None:
                    torch.mm(x_SI[lo:lo + n], w, out=y[lo:lo + n])
                else:
                    torch.addmm(b, x_SI[lo:lo + n], w, out=y[lo:lo + n])
            lo += n
        ctx.save_for_backward(x_SI, *ws)
        ctx.counts, ctx.has_bias = counts, has_bias
        return y

    @staticmethod
    def backward(ctx, grad_SO: torch.Tensor):
        x_SI, *ws = ctx.saved_tensors
        grad_SO = grad_SO.contiguous()
        grad_x = torch.empty_like(x_SI) if ctx.needs_input_grad[0] else None
        grad_w, grad_b, lo = [], [], 0
        for w, n in zip(ws, ctx.counts):
            g = grad_SO[lo:lo + n]
            if grad_x is not None:
                torch.mm(g, w.t(), out=grad_x[lo:lo + n])
            grad_w.append(x_SI[lo:lo + n].t() @ g)  # zeros for an expert without tokens
            if ctx.has_bias:
                grad_b.append(g.sum(0))
            lo += n
        return (grad_x, None, None, *grad_w, *grad_b)


def expert_linear(x_SI: torch.Tensor, p: DispatchPlan, weights_IO: Sequence[torch.Tensor],
                  biases_O: Sequence[torch.Tensor] | None, kernel: str = "auto") -> torch.Tensor:
    """Row s of ``x_SI`` times ``weights_IO[expert of s]`` (+ its bias), rows sorted by expert."""
    device_type = x_SI.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        # Autocast does not reach inside a custom autograd Function, nor grouped_mm: cast here as it
        # would cast a matmul (inputs and weights to the autocast dtype; the casts are differentiable).
        dtype = torch.get_autocast_dtype(device_type)
        x_SI = x_SI.to(dtype)
        weights_IO = [w.to(dtype) for w in weights_IO]
        biases_O = None if biases_O is None else [b.to(dtype) for b in biases_O]
        with torch.autocast(device_type, enabled=False):
            return expert_linear(x_SI, p, weights_IO, biases_O, kernel)
    if kernels.resolve(kernel, x_SI) == "grouped":
        y = F.grouped_mm(x_SI, torch.stack(list(weights_IO)), offs=p.offsets_E)
        if biases_O is not None:
            # one_hot @ bias, not bias[expert_S]: its gradient is a matmul, not index_add atomics
            y = y + F.one_hot(p.expert_S, len(weights_IO)).to(y.dtype) @ torch.stack(list(biases_O))
        return y
    if biases_O is None:
        return _LoopLinear.apply(x_SI, p.counts, False, *weights_IO)
    return _LoopLinear.apply(x_SI, p.counts, True, *weights_IO, *biases_O)


def run_mlp_experts(experts: Sequence[Mlp], x_SD: torch.Tensor, p: DispatchPlan, kernel: str = "auto") -> torch.Tensor:
    """Expert e's timm ``Mlp`` on its rows of the expert-sorted ``x_SD``, all experts at once."""
    first = experts[0]  # the activation, dropout and (identity) norm are the same in every expert
    h = expert_linear(x_SD, p, [m.fc1.weight.t() for m in experts], _biases(experts, "fc1"), kernel)
    h = first.norm(first.drop1(first.act(h)))
    return first.drop2(expert_linear(h, p, [m.fc2.weight.t() for m in experts], _biases(experts, "fc2"), kernel))


class MLPExperts(kernels.KernelChoice, nn.Module):
    def __init__(self, dim: int, hidden: int, num_experts: int, act_layer=nn.GELU):
        super().__init__()
        self.experts = nn.ModuleList(Mlp(dim, hidden, act_layer=act_layer) for _ in range(num_experts))

    def forward(self, x_SD: torch.Tensor, p: DispatchPlan) -> torch.Tensor:
        return run_mlp_experts(self.experts, x_SD, p, self.kernel)


def _biases(experts: Sequence[Mlp], name: str) -> list[torch.Tensor] | None:
    biases = [getattr(m, name).bias for m in experts]
    return None if biases[0] is None else biases


class AttentionProjections(kernels.KernelChoice, nn.Module):
    """Per-expert query (D -> h) and output (h -> D) projections, no bias (reference code)."""

    def __init__(self, dim: int, head_dim: int, num_experts: int):
        super().__init__()
        self.q_weight = nn.Parameter(torch.empty(num_experts, dim, head_dim))
        self.o_weight = nn.Parameter(torch.empty(num_experts, head_dim, dim))
        trunc_normal_(self.q_weight, std=0.02)
        trunc_normal_(self.o_weight, std=0.02)

    def query(self, x_SD: torch.Tensor, p: DispatchPlan) -> torch.Tensor:
        return expert_linear(x_SD, p, self.q_weight.unbind(0), None, self.kernel)

    def output(self, o_SH: torch.Tensor, p: DispatchPlan) -> torch.Tensor:
        return expert_linear(o_SH, p, self.o_weight.unbind(0), None, self.kernel)
