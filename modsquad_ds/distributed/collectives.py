"""The few collectives the trainer calls itself, each a no-op in a world of one.

Why the backward of :func:`all_reduce_sum_autograd` all-reduces (sums) the incoming gradient
---------------------------------------------------------------------------------------------
The global MI loss reads a tasks x experts table G = sum_r T_r, where rank r's T_r comes from its own
micro batch. Every rank computes the same L(G). The single-process reference on the concatenated
batch has the gradient

    g* = dL/dtheta = sum_r  dL/dG . dT_r/dtheta.

DeepSpeed (like DDP) *averages* gradients over the data-parallel ranks: the step uses
(1/W) sum_r g_r, where g_r is what backward leaves on rank r. For that average to equal g*, each
rank must contribute g_r = W . dL/dG . dT_r/dtheta.

- Identity backward (all_reduce on a detached copy plus a straight-through, or an all_reduce autograd
  does not see): g_r = dL/dG . dT_r/dtheta, so the average is g*/W: the MI term silently trains W
  times weaker on W ranks, and the loss weight would need retuning with every world size.
- Sum-all-reduce backward (what this function does, torch.distributed.nn.functional.all_reduce
  semantics): rank r receives sum_s dL_s/dG = W . dL/dG because all W losses are identical, so
  g_r = W . dL/dG . dT_r/dtheta and the average is exactly g*. It is also the true adjoint of a
  sum-all-reduce, so it stays right if ranks ever weight their copies of L differently: the step then
  follows the mean over ranks of the L_s, as it does for every other loss term.

tests/distributed/test_global_mi.py checks both claims numerically: a real DeepSpeed engine on 2 gloo ranks
gives the 1-process gradient on the concatenated batch with this function and half of it with an
identity backward.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def is_distributed(group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)  # never reduce into the input
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad = grad_out.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum_autograd(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``tensor`` over the ranks of ``group`` (default: all ranks), differentiably.

    Forward: the sum; backward: the sum of the incoming gradients (see the module docstring for why
    this makes DeepSpeed's averaged gradient equal the single-process one). Every rank of the group
    must call it, in the same order, in forward and in backward. Returns ``tensor`` itself when not
    distributed.
    """
    if not is_distributed(group):
        return tensor
    return _AllReduceSum.apply(tensor, group)


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def all_reduce_tensor(tensor: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """A new tensor: ``tensor`` reduced over ranks (sum, max or min; not differentiable), on
    ``tensor``'s device. The reduction runs on the backend's device: gloo reduces CPU tensors, NCCL
    only CUDA ones. ``tensor`` itself is left as it was."""
    if op not in _OPS:
        raise ValueError(f"op must be one of {', '.join(_OPS)}, got {op!r}")
    if not is_distributed(group):
        return tensor.clone()
    on = tensor.to(_device(group), copy=True)
    dist.all_reduce(on, op=_OPS[op], group=group)
    return on.to(tensor.device)


def all_reduce_scalar(value: float, op: str = "sum", group=None) -> float:
    """A Python float reduced over ranks (sum, max or min); for logging and stop decisions."""
    if not is_distributed(group):
        return float(value)
    return float(all_reduce_tensor(torch.tensor([float(value)], dtype=torch.float64), op, group)[0])


def any_rank(flag: bool, group=None) -> bool:
    """True on every rank if ``flag`` is true on any rank: the NaN-storm stop must be a collective
    decision, or the ranks that stop leave the others waiting in the next all-reduce."""
    return all_reduce_scalar(1.0 if flag else 0.0, op="max", group=group) > 0.0


def step_vote(loss: torch.Tensor, wish: float, group=None) -> tuple[bool, float]:
    """The trainer's one collective per micro step: ``(loss finite on every rank, largest wish)``.

    ``wish`` is this rank's stop request (the trainer's 0 go on, 1 save, 2 save and stop). Both go in
    one MAX all-reduce of two numbers made on the loss's device, so the finite check and the stop
    vote cost one collective and one device-to-host read per micro step, the least failure detection
    needs: a NaN on one rank must stop every rank together, or the others wait in the next all-reduce.
    """
    nonfinite = ~torch.isfinite(loss.detach()).all()
    if not is_distributed(group):
        return not bool(nonfinite), float(wish)
    flags = torch.full((2,), float(wish), dtype=torch.float32, device=loss.device)
    flags[0] = nonfinite  # a device copy, no sync
    flags = flags.to(_device(group))  # gloo reduces CPU tensors, NCCL only CUDA ones
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    bad, most = flags.tolist()
    return bad == 0.0, most


def _device(group: Optional[object]) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
