"""No host sync on the training step's device path, proven without a GPU.

A tensor on the ``meta`` device has a shape and a dtype but no values: any ``.item()``,
``.tolist()``, ``.cpu()``, ``bool(tensor)`` or data-dependent shape on it raises. So a step that runs
on meta reads nothing back from the device, which on CUDA means it never stalls the host waiting
for the GPU (issue 7: a host sync per MoE layer made the small preset launch-bound).

The grouped expert kernel is the one ``auto`` picks on sm90+ GPUs in bf16, and ``grouped_mm``'s meta
kernel takes bf16 only, hence bf16 here. The per-expert loop needs the counts on the host (by design,
moe/kernels.py): the last test shows this method catches exactly such a read.
"""

import pytest
import torch

from modsquad_ds.config import load_config
from modsquad_ds.data.synthetic import synthetic_batch
from modsquad_ds.eval.usage import RouteRecorder
from modsquad_ds.model import build_model
from modsquad_ds.model.objective import MultiTaskObjective
from modsquad_ds.moe.ds_adapter import convert_to_expert_parallel
from modsquad_ds.moe.kernels import has_grouped_mm, set_kernel
from modsquad_ds.train.module import TrainModule
from modsquad_ds.train.usage import UsageAccumulator

pytestmark = pytest.mark.skipif(not has_grouped_mm(), reason="needs torch.nn.functional.grouped_mm")


def _meta_module(kernel: str, overrides=(), as_trained: bool = True):
    """The tiny model on meta in bf16; ``as_trained``: its MoE MLP layers converted to DeepSpeed's MoE
    at ep_size 1 as the trainer does (moe/ds_adapter/; they run the local dropless dispatch)."""
    cfg = load_config(preset="tiny", overrides=list(overrides))
    model = build_model(cfg)
    if as_trained:
        convert_to_expert_parallel(model, ep_size=1)
    module = TrainModule(model, MultiTaskObjective(cfg), lambda t: t)
    assert set_kernel(module, kernel) > 0
    return cfg, module.to("meta", torch.bfloat16)


def _batch(cfg):
    return synthetic_batch(cfg.tasks.names, 2, cfg.model.img_size, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("as_trained", [True, False], ids=["trainer_model", "single_process_model"])
@pytest.mark.parametrize("overrides", [[], ["model.grad_checkpointing=true"]], ids=["plain", "grad_checkpointing"])
def test_the_training_step_reads_nothing_back_from_the_device(overrides, as_trained):
    cfg, module = _meta_module("grouped", overrides, as_trained)
    module.train()
    loss, stats, routing = module(_batch(cfg))  # forward, per-task losses, MI loss, statistics
    loss.backward()
    assert loss.is_meta and all(v.is_meta for v in stats.values())
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.is_meta for g in grads)
    usage = UsageAccumulator(cfg.tasks.names)  # the trainer's per-micro-step usage sums
    usage.add(routing)
    assert all(entry["counts"].is_meta for entry in usage.layers.values())


def test_evaluation_routing_sums_stay_on_the_device():
    cfg, module = _meta_module("grouped")
    model = module.model.eval()
    with torch.no_grad(), RouteRecorder(model, cfg.tasks.names) as recorder:
        recorder.sample_weight = torch.ones(2, device="meta")
        model(torch.empty(2, 3, cfg.model.img_size, cfg.model.img_size, device="meta", dtype=torch.bfloat16))
    assert recorder.layers and all(layer.soft_TE.is_meta for layer in recorder.layers.values())


def test_the_loop_kernel_reads_the_counts_and_meta_catches_it():
    cfg, module = _meta_module("loop")
    with pytest.raises((RuntimeError, NotImplementedError)):
        module(_batch(cfg))


@pytest.mark.parametrize("as_trained", [True, False], ids=["trainer_model", "single_process_model"])
def test_the_loop_kernel_reads_the_counts_once_per_layer(monkeypatch, as_trained):
    """Where the loop runs on a GPU (fp32, or before sm90) each read of the counts is a host sync: one
    per MoE layer, shared by its projections (MoA's query and output, an MLP's fc1 and fc2). On the
    CPU the general path (the one GPUs run) is taken with moe/cpu_mlp.py's one-pass path off."""
    from modsquad_ds.moe import MoEAttention, MoEMlp, cpu_mlp
    from modsquad_ds.moe.ds_adapter import ExpertParallelMoEMlp

    cfg = load_config(preset="tiny")
    model = build_model(cfg)
    if as_trained:
        convert_to_expert_parallel(model, ep_size=1)
    set_kernel(model, "loop")
    monkeypatch.setattr(cpu_mlp, "fusable", lambda expert, x: False)
    layers = sum(isinstance(m, (MoEAttention, MoEMlp, ExpertParallelMoEMlp)) for m in model.modules())
    experts = {cfg.moe.attn.num_experts, cfg.moe.mlp.num_experts}
    reads = []
    tolist = torch.Tensor.tolist

    def counting(t):
        if t.dim() == 1 and t.dtype == torch.long and len(t) in experts:
            reads.append(len(t))
        return tolist(t)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    model(torch.randn(2, 3, cfg.model.img_size, cfg.model.img_size))
    assert layers > 0 and len(reads) == layers
