"""The grouped expert kernel issues as many kernels for 16 experts as for 4: nothing per expert.

Issue 7's first GPU profile found the step launch-bound: the host issued ~1,000 matmuls and ~1,900
dtype casts per step (a cast per expert weight under autocast), and took twice as long to issue
the work as the GPU took to run it. Every aten op that computes is a launch on a GPU, so counting
them on the CPU finds a per-expert launch without a GPU (benchmarks/host_overhead.py counts a step).
Views are left out: they alias and launch nothing.
"""

import collections
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from modsquad_ds.moe import MoEAttention, MoEMlp
from modsquad_ds.moe.ds_adapter import ExpertParallelMoEMlp
from modsquad_ds.moe.kernels import has_grouped_mm, set_kernel

pytestmark = pytest.mark.skipif(not has_grouped_mm(), reason="needs torch.nn.functional.grouped_mm")


class KernelCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _layer(kind: str, num_experts: int):
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


def _kernels(layer, autocast: bool) -> collections.Counter:
    x = torch.randn(3, 2, 5, 32, requires_grad=True)
    task_ids = torch.tensor([0, 1, 2])
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with KernelCount() as counter:
        with cast:
            y, stats = layer(x, task_ids)
        (y.float().square().sum() + stats.prob_table_TE.sum() + stats.gate_table_TE.sum()).backward()
    assert all(p.grad is not None for p in layer.parameters())
    return counter.ops


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("kind", ["mlp", "attn", "trainer_mlp"])
def test_forward_and_backward_kernels_do_not_grow_with_the_number_of_experts(kind, autocast):
    few, many = _kernels(_layer(kind, 4), autocast), _kernels(_layer(kind, 16), autocast)
    assert few == many, f"ops that grew with the experts: {dict(many - few)}"
