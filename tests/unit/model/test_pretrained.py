"""Loading a dense timm ViT checkpoint from a local file initialises our dense parts exactly."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from modsquad_ds.config import load_config
from modsquad_ds.model import build_dense_peer, build_model


def _timm_vit(img_size=32):
    torch.manual_seed(3)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img_size, patch_size=8,
                             embed_dim=64, depth=4, num_heads=4, num_classes=0)


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "wrapped"])
def test_dense_model_from_timm_checkpoint_reproduces_timm_features(tmp_path, fmt):
    vit = _timm_vit().eval()
    path = tmp_path / f"vit.{ 'safetensors' if fmt == 'safetensors' else 'pth'}"
    state = {k: v.contiguous() for k, v in vit.state_dict().items()}
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save({"model": state} if fmt == "wrapped" else state, path)

    cfg = load_config(overrides=[f"model.pretrained={path}", "tasks.names=[normal]"])
    model = build_dense_peer(cfg)
    from modsquad_ds.model.pretrained import load_dense_checkpoint

    report = load_dense_checkpoint(model, path)
    assert report.unused == []
    with torch.no_grad():
        model.task_embed.zero_()  # timm's ViT has no task embedding
        model.eval()
        images = torch.randn(2, 3, 32, 32)
        ours, _ = model.forward_features(images, model.task_ids())
        theirs = vit.forward_features(images)
    torch.testing.assert_close(ours[0], theirs, rtol=1e-5, atol=1e-5)


def test_moe_model_loads_dense_parts_and_reports_the_rest(tmp_path):
    vit = _timm_vit(img_size=64)  # another resolution: the position embedding is resampled
    path = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), path)
    cfg = load_config(overrides=[f"model.pretrained={path}"])
    model = build_model(cfg)
    torch.testing.assert_close(model.blocks[1].attn.attn.qkv.weight, vit.blocks[1].attn.qkv.weight)
    torch.testing.assert_close(model.blocks[0].mlp.mlp.fc1.weight, vit.blocks[0].mlp.fc1.weight)
    torch.testing.assert_close(model.patch_embed.proj.weight, vit.patch_embed.proj.weight)
    assert model.pos_embed.shape == (1, 17, 64)
    from modsquad_ds.model.pretrained import load_dense_checkpoint

    report = load_dense_checkpoint(model, path)
    assert "blocks.0.attn.qkv.weight" in report.unused  # block 0 attention is MoE
    assert "blocks.1.mlp.fc1.weight" in report.unused  # block 1 MLP is MoE


def test_bad_checkpoints_fail_with_the_key_named(tmp_path):
    cfg = load_config(overrides=[f"model.pretrained={tmp_path / 'none.pth'}"])
    with pytest.raises(FileNotFoundError, match="model.pretrained"):
        build_model(cfg)
    wrong = tmp_path / "wide.pth"
    torch.save({"patch_embed.proj.weight": torch.zeros(96, 3, 8, 8)}, wrong)
    with pytest.raises(ValueError, match="embed_dim"):
        build_model(load_config(overrides=[f"model.pretrained={wrong}"]))
