import pytest
import timm
import torch

from modsquad_ds.config import PRESETS, load_config
from modsquad_ds.data.synthetic import synthetic_batch
from modsquad_ds.model import build_dense_peer, build_model
from modsquad_ds.model.objective import MultiTaskObjective
from modsquad_ds.model.vit import block_kinds
from modsquad_ds.moe import MoEAttention, MoEMlp

TASKS = ["class_scene", "depth_euclidean", "normal", "principal_curvature", "segment_semantic"]


def _tiny(*overrides):
    cfg = load_config(overrides=[f"tasks.names=[{','.join(TASKS)}]", *overrides])
    torch.manual_seed(0)
    return cfg, build_model(cfg)


@pytest.mark.parametrize("overrides", [
    [], ["moe.placement=every"], ["moe.first_block=2"], ["moe.placement=every", "moe.first_block=1"],
])
def test_task_batched_forward_equals_separate_per_task_forwards(overrides):
    cfg, model = _tiny("moe.router_noise=false", *overrides)
    model.train()  # training mode: no noise configured, so routing is deterministic
    images = torch.randn(3, 3, 32, 32)
    together = model(images)
    assert list(together.preds) == TASKS
    for task in TASKS:
        alone = model(images, [task])
        torch.testing.assert_close(together.preds[task], alone.preds[task], rtol=1e-5, atol=1e-5)
        for joint, single in zip(together.routing, alone.routing):
            t = TASKS.index(task)
            torch.testing.assert_close(joint.prob_table_TE[t], single.prob_table_TE[t], rtol=1e-5, atol=1e-5)


def test_prefix_runs_once_and_task_embedding_only_after_it():
    cfg, model = _tiny("moe.first_block=2")
    kinds = block_kinds(cfg.model.depth, cfg.moe)
    assert kinds == [(False, False), (False, False), (True, False), (False, True)]
    calls = []
    model.blocks[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    model(torch.randn(2, 3, 32, 32))
    assert calls == [1], "the dense prefix must run once for all tasks, not once per task"


def test_placements_build_the_papers_variants():
    cfg, model = _tiny()
    layers = [(type(b.attn).__name__, type(b.mlp).__name__) for b in model.blocks]
    assert layers == [("MoEAttention", "DenseMlp"), ("DenseAttention", "MoEMlp")] * 2
    _, every = _tiny("moe.placement=every")
    assert all(isinstance(b.attn, MoEAttention) and isinstance(b.mlp, MoEMlp) for b in every.blocks)
    _, mlp_only = _tiny("moe.placement=every", "moe.attn.enabled=false")
    assert not any(isinstance(b.attn, MoEAttention) for b in mlp_only.blocks)


def test_output_shapes_and_every_router_and_head_gets_gradient():
    cfg, model = _tiny()
    batch = synthetic_batch(TASKS, 2, 32, torch.Generator().manual_seed(0))
    out = model(batch["image"])
    assert out.preds["class_scene"].shape == (2, 63)
    assert out.preds["normal"].shape == (2, 3, 32, 32)
    assert out.preds["segment_semantic"].shape == (2, 17, 32, 32)
    assert [r.layer for r in out.routing] == ["blocks.0.attn", "blocks.1.mlp", "blocks.2.attn", "blocks.3.mlp"]
    objective = MultiTaskObjective(cfg)
    loss, stats = objective(out, batch)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert objective.weighting.log_vars.grad is not None
    for layer in model.modules():
        if isinstance(layer, (MoEAttention, MoEMlp)):
            per_task = layer.router.task_wg.grad.abs().sum(dim=(1, 2))
            assert (per_task > 0).all(), "every task's router must receive gradient"


def test_pixel_head_unpatchifies_in_raster_order():
    cfg, model = _tiny()
    head = model.heads["depth_euclidean"]
    with torch.no_grad():
        head.proj.weight.zero_()
        head.proj.bias.copy_(torch.arange(64.0))  # value = position inside the 8x8 patch
    tokens = torch.zeros(1, 17, 64)
    out = head(tokens)[0, 0]
    assert torch.equal(out[:8, :8], torch.arange(64.0).view(8, 8))
    assert torch.equal(out[8:16, 24:32], torch.arange(64.0).view(8, 8))


def test_pixel_head_places_each_patch_token_at_its_grid_cell():
    """Each patch token carries its own index k = r * grid + c (feature 0, passed through by the
    head); the 3-channel head's bias marks the place inside the patch and the channel. The output
    cell (r, c) must hold token r * grid + c: row-major over the grid, not transposed."""
    cfg, model = _tiny()
    head = model.heads["normal"]  # 3 channels, 8x8 patches, 4x4 grid on 32x32 images
    with torch.no_grad():
        head.proj.weight.zero_()
        head.proj.weight[:, 0] = 1000.0  # every output value = 1000 * token feature 0 + bias
        head.proj.bias.copy_(torch.arange(192.0))  # output unit (i * 8 + j) * 3 + ch
    tokens = torch.zeros(1, 17, 64)
    tokens[0, 0, 0] = -7.0  # the class token is dropped: must appear nowhere
    tokens[0, 1:, 0] = torch.arange(16.0)  # patch token k carries k
    out = head(tokens)[0]
    assert out.shape == (3, 32, 32)
    inside = torch.arange(64.0).view(8, 8) * 3  # (i * 8 + j) * 3
    for r in range(4):
        for c in range(4):
            for ch in range(3):
                block = out[ch, 8 * r:8 * r + 8, 8 * c:8 * c + 8]
                assert torch.equal(block, 1000.0 * (r * 4 + c) + inside + ch), (r, c, ch)
    # two cells spelled out: (0, 1) holds token 1, (1, 0) holds token 4
    assert out[0, 0, 8].item() == 1000.0 and out[0, 8, 0].item() == 4000.0


@pytest.mark.parametrize("first_block", [0, 1])
def test_task_embedding_is_added_before_every_block_after_the_prefix(first_block):
    """The reference code adds task_embed[t] to slot t's tokens before every block from
    ``moe.first_block`` on (eq. 4), not once: each such block's input equals the previous block's
    output (the prefix's output for the first one) plus its slot's task embedding, for every slot,
    also with a reordered task selection."""
    cfg, model = _tiny(f"moe.first_block={first_block}", "moe.router_noise=false")
    model.eval()
    with torch.no_grad():  # distinct, large embeddings per task so that a missing add shows
        model.task_embed.copy_(torch.arange(len(TASKS) * 64.0).view(len(TASKS), 64) / 10.0)
    inputs, outputs = [], []

    def record(module, args, out):
        inputs.append(args[0])
        outputs.append(out[0])

    for block in model.blocks[first_block:]:
        block.register_forward_hook(record)
    images = torch.randn(2, 3, 32, 32)
    for selection in (None, ["normal", "class_scene", "segment_semantic"]):
        inputs.clear()
        outputs.clear()
        with torch.no_grad():
            model(images, selection)
            prefix = model.embed(images)  # (1, B, N, D)
        ids = list(range(len(TASKS))) if selection is None else [TASKS.index(t) for t in selection]
        assert len(inputs) == cfg.model.depth - first_block
        before = [prefix.expand(len(ids), -1, -1, -1)] + outputs[:-1]
        for x_in, x_prev in zip(inputs, before):
            assert x_in.shape[0] == len(ids)
            for slot, t in enumerate(ids):
                torch.testing.assert_close(x_in[slot], x_prev[slot] + model.task_embed[t], rtol=0, atol=0)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_builds_and_is_registered_with_timm(preset):
    name = {"tiny": "modsquad_vit_tiny_patch8_32", "small": "modsquad_vit_small_patch16_224",
            "base": "modsquad_vit_base_patch16_224"}[preset]
    model = timm.create_model(name, tasks=["normal", "class_object"])
    assert model.task_names == ["normal", "class_object"]
    cfg = load_config(preset=preset)
    assert model.patch_embed.img_size == (cfg.model.img_size, cfg.model.img_size)
    assert len(model.blocks) == cfg.model.depth
    if preset == "tiny":
        out = model(torch.randn(1, 3, 32, 32))
        assert out.preds["normal"].shape == (1, 3, 32, 32)


def test_timm_refuses_downloading_pretrained():
    with pytest.raises(ValueError, match="pretrained_file"):
        timm.create_model("modsquad_vit_tiny_patch8_32", pretrained=True)


def test_dense_peer_has_no_moe_and_same_width():
    cfg = load_config(preset="tiny")
    dense = build_dense_peer(cfg)
    assert not any(isinstance(m, (MoEAttention, MoEMlp)) for m in dense.modules())
    assert dense.norm.normalized_shape == (cfg.model.embed_dim,)
