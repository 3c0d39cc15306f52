"""The MLP experts on a CPU: fc1 -> GELU -> fc2 expert by expert, while the expert's rows are in cache.

The ``loop`` kernel runs fc1 for every expert, then the activation over all ``S`` rows, then fc2:
the ``(S, hidden)`` activations (25 MB at ViT-S shapes with 4 tasks of 1,024 tokens) go through
memory three times forward and more in backward, exactly as in the dense MLP. Here each expert's
chunk (a few hundred KB to a few MB) runs its two matmuls and its GELU back to back, and backward
recomputes the GELU from the saved pre-activation instead of keeping a second ``(S, hidden)``
tensor. Same math as :func:`~modsquad_ds.moe.experts.run_mlp_experts`, to float rounding.

Only where it pays: on the CPU (a GPU's L2 holds the whole activation anyway, and per-expert GELU
launches would cost more than they save), without autocast, for timm ``Mlp`` experts whose norm
is the identity and whose dropouts are off (the model's experts: ``Mlp`` defaults).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp


def fusable(expert: Mlp, x_SD: torch.Tensor) -> bool:
    """True where :func:`loop_mlp` computes what ``expert``'s modules would, and pays."""
    return (x_SD.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
            and type(expert.act) is nn.GELU and isinstance(expert.norm, nn.Identity)
            and expert.fc1.bias is not None and expert.fc2.bias is not None
            and all(not d.training or d.p == 0 for d in (expert.drop1, expert.drop2)))


def loop_mlp(x_SD: torch.Tensor, counts: list[int], w1_EHD: torch.Tensor, b1_EH: torch.Tensor,
             w2_EOH: torch.Tensor, b2_EO: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """Expert e's MLP (weights stacked in ``nn.Linear`` layout) on its ``counts[e]`` rows of the
    expert-sorted ``x_SD``."""
    return _LoopMlp.apply(x_SD, counts, approximate, w1_EHD, b1_EH, w2_EOH, b2_EO)


class _LoopMlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_SD, counts, approximate, w1_EHD, b1_EH, w2_EOH, b2_EO):
        h_SH = x_SD.new_empty(x_SD.shape[0], w1_EHD.shape[1])  # pre-activations, kept for backward
        y_SO = x_SD.new_empty(x_SD.shape[0], w2_EOH.shape[1])
        lo = 0
        for e, n in enumerate(counts):
            if n:
                rows = slice(lo, lo + n)
                # mm, then the bias in place: addmm into a slice of a fresh buffer cost 20% more
                h = torch.mm(x_SD[rows], w1_EHD[e].t(), out=h_SH[rows]).add_(b1_EH[e])
                torch.mm(F.gelu(h, approximate=approximate), w2_EOH[e].t(), out=y_SO[rows]).add_(b2_EO[e])
            lo += n
        ctx.save_for_backward(x_SD, h_SH, w1_EHD, w2_EOH)
        ctx.counts, ctx.approximate = counts, approximate
        return y_SO

    @staticmethod
    def backward(ctx, grad_SO):
        x_SD, h_SH, w1_EHD, w2_EOH = ctx.saved_tensors
        grad_SO = grad_SO.contiguous()
        grad_x = torch.empty_like(x_SD)
        grads = (torch.empty_like(w1_EHD), w1_EHD.new_empty(w1_EHD.shape[:2]),
                 torch.empty_like(w2_EOH), w2_EOH.new_empty(w2_EOH.shape[:2]))
        g_w1, g_b1, g_w2, g_b2 = grads
        lo = 0
        for e, n in enumerate(ctx.counts):
            rows = slice(lo, lo + n)
            g, h = grad_SO[rows], h_SH[rows]
            if n:
                torch.mm(g.t(), F.gelu(h, approximate=ctx.approximate), out=g_w2[e])
                torch.sum(g, 0, out=g_b2[e])
                g_h = torch.ops.aten.gelu_backward(g @ w2_EOH[e], h, approximate=ctx.approximate)
                torch.mm(g_h.t(), x_SD[rows], out=g_w1[e])
                torch.sum(g_h, 0, out=g_b1[e])
                torch.mm(g_h, w1_EHD[e], out=grad_x[rows])
            else:  # an expert without rows
                for grad in grads:
                    grad[e].zero_()
            lo += n
        return grad_x, None, None, *grads
