"""Counting the kernels an MoE layer's forward and backward issue: every aten op that computes is a
launch on a GPU; views (ops that only alias) launch nothing. Shared by tests/unit/moe/test_launches.py
and its GPU twin, tests/gpu/test_launches_cuda.py."""

import collections
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from modsquad_ds.moe import MoEAttention, MoEMlp
from modsquad_ds.moe.ds_adapter import ExpertParallelMoEMlp
from modsquad_ds.moe.kernels import set_kernel

KINDS = ["mlp", "attn", "trainer_mlp"]


class KernelCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def moe_layer(kind: str, num_experts: int):
    """A small MoE layer of ``kind`` with the grouped expert kernel."""
    torch.manual_seed(0)
    dim, top_k, tasks = 32, 2, 3
    if kind == "attn":
        layer = MoEAttention(dim, 16, num_experts, top_k, tasks)
    elif kind == "mlp":
        layer = MoEMlp(dim, 32, num_experts, top_k, tasks)
    else:  # the trainer's MoE MLP at ep_size 1 (DeepSpeed's MoE running the dropless dispatch)
        layer = ExpertParallelMoEMlp(dim, 32, num_experts, top_k, tasks, ep_size=1)
    set_kernel(layer, "grouped")
    return layer.train()


def kernels_of_a_step(layer, autocast: bool) -> collections.Counter:
    """The kernels of the layer's forward and backward (and of a loss on its outputs and tables)."""
    weight = next(layer.parameters())
    device = weight.device
    x = torch.randn(3, 2, 5, 32, device=device, dtype=weight.dtype, requires_grad=True)
    task_ids = torch.tensor([0, 1, 2], device=device)
    cast = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with KernelCount() as counter:
        with cast:
            y, stats = layer(x, task_ids)
        (y.float().square().sum() + stats.prob_table_TE.sum() + stats.gate_table_TE.sum()).backward()
    assert all(p.grad is not None for p in layer.parameters())
    return counter.ops
