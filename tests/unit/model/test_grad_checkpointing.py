"""``model.grad_checkpointing`` recomputes blocks in backward: the same losses and gradients, with
router noise and drop path on (their random draws are replayed), and it saves activation memory."""

import torch

from modsquad_ds.config import load_config
from modsquad_ds.data.synthetic import synthetic_batch
from modsquad_ds.model import build_model
from modsquad_ds.model.objective import MultiTaskObjective

TASKS = ["class_scene", "depth_euclidean", "normal", "segment_semantic"]


def _loss_and_grads(checkpointing: bool):
    cfg = load_config(overrides=[f"tasks.names=[{','.join(TASKS)}]", "model.drop_path_rate=0.2",
                                 f"model.grad_checkpointing={str(checkpointing).lower()}"])
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    batch = synthetic_batch(TASKS, 3, cfg.model.img_size, torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # the same router noise and drop-path draws in both runs
    loss, stats = MultiTaskObjective(cfg)(model(batch["image"]), batch)
    loss.backward()
    return model.grad_checkpointing, loss, stats, {n: p.grad for n, p in model.named_parameters()}


def test_checkpointed_run_has_the_same_losses_and_gradients():
    on, loss, stats, grads = _loss_and_grads(True)
    off, loss_ref, stats_ref, grads_ref = _loss_and_grads(False)
    assert on and not off
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
    assert stats.keys() == stats_ref.keys()
    for key in stats:
        torch.testing.assert_close(stats[key], stats_ref[key], rtol=1e-6, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert grads[name] is not None, name
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_checkpointing_keeps_fewer_tensors_for_backward():
    """Counts the bytes autograd saves during the forward (what stays resident until backward)."""
    cfg = load_config(overrides=[f"tasks.names=[{','.join(TASKS)}]"])
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = synthetic_batch(TASKS, 3, cfg.model.img_size, torch.Generator().manual_seed(1))
    saved = {}
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        total = [0]

        def pack(t, total=total):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(batch["image"])
        saved[enable] = total[0]
    assert saved[True] < saved[False] / 2, saved
