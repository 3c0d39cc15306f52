"""No host sync in a CUDA training step: CUDA's own sync detector, the GPU twin of
tests/unit/train/test_no_host_sync.py (which proves the same on the meta device).

``torch.cuda.set_sync_debug_mode("error")`` raises on any operation that makes the host wait for the
GPU (``.item()``, ``.tolist()``, ``.cpu()``, ``nonzero``, a read-back inside a kernel's launcher).
Warm-up first: the first step may sync while it sets up cuBLAS handles and caches.
"""

import warnings

import pytest
import torch

from modsquad_ds.config import load_config
from modsquad_ds.data.synthetic import synthetic_batch
from modsquad_ds.model import build_model
from modsquad_ds.model.objective import MultiTaskObjective
from modsquad_ds.moe import MoEAttention, MoEMlp, kernels
from modsquad_ds.moe.ds_adapter import ExpertParallelMoEMlp, clip_grad_norm_, convert_to_expert_parallel
from modsquad_ds.moe.kernels import grouped_supported, set_kernel
from modsquad_ds.train.module import TrainModule, to_device


def _fused_or_skip() -> None:
    if not grouped_supported("cuda", torch.cuda.current_device(), torch.bfloat16):
        pytest.skip("the grouped kernel (sm90+, bf16) is the sync-free one; the loop reads the counts")


@pytest.mark.parametrize("as_trained", [True, False], ids=["trainer_model", "single_process_model"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad_checkpointing"])
def test_a_bf16_training_step_never_waits_for_the_gpu(checkpointing, as_trained):
    _fused_or_skip()
    device = torch.device("cuda")
    overrides = ["model.grad_checkpointing=true"] if checkpointing else []
    cfg = load_config(preset="tiny", overrides=overrides)
    torch.manual_seed(0)
    model = build_model(cfg)
    if as_trained:  # MoE MLP layers as DeepSpeed MoE at ep_size 1, as the trainer builds them
        convert_to_expert_parallel(model, ep_size=1)
    module = TrainModule(model, MultiTaskObjective(cfg), lambda t: t).to(device, torch.bfloat16)
    set_kernel(module, "auto")
    batch = to_device(synthetic_batch(cfg.tasks.names, 4, cfg.model.img_size, torch.Generator().manual_seed(0)),
                      device)
    loss, _, _ = module(batch)
    loss.backward()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, stats, routing = module(batch)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item() and all(torch.isfinite(v).all().item() for v in stats.values())


def test_a_forward_on_named_tasks_never_waits_for_the_gpu():
    """predict (on a run's full model) and benchmarks/export_speed.py select tasks by name: the ids
    reach the GPU in the queue, not by a blocking copy (torch.tensor(ids, device=cuda) waited for
    all queued work, every forward)."""
    _fused_or_skip()
    cfg = load_config(preset="tiny")
    torch.manual_seed(0)
    model = build_model(cfg).to("cuda", torch.bfloat16).eval()
    images = torch.randn(2, 3, cfg.model.img_size, cfg.model.img_size, device="cuda", dtype=torch.bfloat16)
    names = list(cfg.tasks.names[:2])
    with torch.no_grad():
        model(images, names)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = model(images, names)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert sorted(out.preds) == sorted(names) and all(torch.isfinite(p).all().item() for p in out.preds.values())


def test_the_grouped_kernel_probe_never_waits_for_the_gpu(monkeypatch):
    """The probe may run first inside a step that must not sync; an error there (the sync detector's
    included) would have switched the process to the loop kernel for good."""
    _fused_or_skip()
    monkeypatch.setattr(kernels, "_PROBED", {})
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        supported = kernels.grouped_supported("cuda", torch.cuda.current_device(), torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert supported, "the probe (or grouped_mm itself) synced, and was taken for a missing kernel"


@pytest.mark.parametrize("as_trained", [True, False], ids=["trainer_model", "single_process_model"])
def test_the_loop_kernel_waits_once_per_moe_layer(as_trained):
    """fp32 (or a GPU before sm90) runs the loop kernel, which reads the counts: one sync per layer."""
    cfg = load_config(preset="tiny")
    torch.manual_seed(0)
    model = build_model(cfg)
    if as_trained:
        convert_to_expert_parallel(model, ep_size=1)
    model = model.cuda()
    set_kernel(model, "loop")
    layers = sum(isinstance(m, (MoEAttention, MoEMlp, ExpertParallelMoEMlp)) for m in model.modules())
    images = torch.randn(2, 3, cfg.model.img_size, cfg.model.img_size, device="cuda")
    model(images)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model(images)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchronizing" in str(w.message)]
    assert layers > 0 and len(syncs) == layers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_expert_parallel_clip_never_waits_for_the_gpu_and_clips(dtype):
    """moe.ds_adapter.clip_grad_norm_ (the trainer's clipping at ZeRO 0 with ep_size > 1) on CUDA: the
    norm equals the float64 norm of the gradients to 1e-6, the gradients end at ``max_norm``, and
    nothing waits for the GPU (the CPU suite proves the same on meta: test_ds_gate_contract.py)."""
    cfg = load_config(preset="tiny")
    torch.manual_seed(0)
    model = convert_to_expert_parallel(build_model(cfg), ep_size=1).to("cuda", dtype)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    want = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters()))
    clip_grad_norm_(model, max_norm=0.0)  # warm-up: measure only
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        total = clip_grad_norm_(model, max_norm=0.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(total.double(), want, rtol=1e-6, atol=0)
    after = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters()))
    assert abs(float(after) - 0.5) < (1e-5 if dtype == torch.float32 else 5e-3)
