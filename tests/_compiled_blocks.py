"""Where ``torch.compile`` splits the model's transformer blocks (``model.compile`` compiles each block):
every graph break ends a graph, runs Python eagerly and starts another, losing the fusions and the
launch savings that compiling is for. Shared by tests/unit/model/test_compile.py and its GPU twin,
tests/gpu/test_compile_cuda.py."""

from pathlib import Path

import torch
import torch._dynamo

from modsquad_ds.config import load_config
from modsquad_ds.model import build_model
from modsquad_ds.moe.ds_adapter import convert_to_expert_parallel
from modsquad_ds.moe.kernels import set_kernel


def moe_blocks(kernel: str):
    """The tiny preset's blocks, as the trainer builds them (MoE MLP layers as DeepSpeed MoE at
    ep_size 1), with ``kernel`` for every expert projection; and the number of tasks."""
    cfg = load_config(preset="tiny")
    torch.manual_seed(0)
    model = build_model(cfg)
    convert_to_expert_parallel(model, ep_size=1)
    set_kernel(model, kernel)
    return model.blocks, len(cfg.tasks.names)


def graph_breaks(block, x_TBND: torch.Tensor, task_ids_T: torch.Tensor) -> list[str]:
    """Why the compiler breaks ``block``'s forward into more than one graph (each reason's first
    line and where in our code it happened); empty when the block compiles to one graph."""
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(block)(x_TBND, task_ids_T)
    finally:
        torch._dynamo.reset()
    return [f"{str(r.reason).splitlines()[0]} at {_where(r.user_stack)}" for r in explained.break_reasons]


def _where(stack) -> str:
    return " <- ".join(f"{Path(frame.filename).name}:{frame.lineno}" for frame in reversed(stack[-2:]))
