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


def graph_breaks_per_block(device: str, kernel: str, params: str) -> dict[int, list[str]]:
    """The tiny preset's blocks, built as the trainer builds them (MoE MLP layers as DeepSpeed MoE at
    ep_size 1), ``kernel`` for every expert projection, in bf16: ``params`` "bf16" as DeepSpeed's bf16
    engines hold the module, "fp32_autocast" as a plain loop under autocast. For each block that the
    compiler breaks into more than one graph: why (each reason's first line and where in our code)."""
    cfg = load_config(preset="tiny")
    torch.manual_seed(0)
    model = build_model(cfg)
    convert_to_expert_parallel(model, ep_size=1)
    set_kernel(model, kernel)
    blocks, autocast = model.blocks.to(device), params == "fp32_autocast"
    if not autocast:
        blocks.to(torch.bfloat16)
    num_tasks = len(cfg.tasks.names)
    dtype = torch.float32 if autocast else torch.bfloat16
    x = torch.randn(num_tasks, 2, 17, cfg.model.embed_dim, device=device, dtype=dtype)
    task_ids = torch.arange(num_tasks, device=device)
    breaks = {}
    for i, block in enumerate(blocks):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            reasons = _graph_breaks(block, x, task_ids)
        if reasons:
            breaks[i] = reasons
    return breaks


def _graph_breaks(block, x_TBND: torch.Tensor, task_ids_T: torch.Tensor) -> list[str]:
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(block)(x_TBND, task_ids_T)
    finally:
        torch._dynamo.reset()
    return [f"{str(r.reason).splitlines()[0]} at {_where(r.user_stack)}" for r in explained.break_reasons]


def _where(stack) -> str:
    return " <- ".join(f"{Path(frame.filename).name}:{frame.lineno}" for frame in reversed(stack[-2:]))
