"""No host sync in a CUDA training step: CUDA's own sync detector, the GPU twin of
tests/unit/train/test_no_host_sync.py (which proves the same on the meta device).

``torch.cuda.set_sync_debug_mode("error")`` raises on any operation that makes the host wait for the
GPU (``.item()``, ``.tolist()``, ``.cpu()``, ``nonzero``, a read-back inside a kernel's launcher).
Warm-up first: the first step may sync while it sets up cuBLAS handles and caches.
"""

import pytest
import torch

from modsquad_ds.config import load_config
from modsquad_ds.data.synthetic import synthetic_batch
from modsquad_ds.model import build_model
from modsquad_ds.model.objective import MultiTaskObjective
from modsquad_ds.moe.ds_adapter import convert_to_expert_parallel
from modsquad_ds.moe.kernels import grouped_supported, set_kernel
from modsquad_ds.train.module import TrainModule, to_device


@pytest.mark.parametrize("as_trained", [True, False], ids=["trainer_model", "single_process_model"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad_checkpointing"])
def test_a_bf16_training_step_never_waits_for_the_gpu(checkpointing, as_trained):
    device = torch.device("cuda")
    if not grouped_supported("cuda", device.index, torch.bfloat16):
        pytest.skip("the grouped kernel (sm90+, bf16) is the sync-free one; the loop reads the counts")
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
