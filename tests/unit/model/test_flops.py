"""FLOP counting: known ViT figures and the MoE layers' active FLOPs computed by hand."""

import pytest
import timm
import torch

from modsquad_ds.config import load_config
from modsquad_ds.model import build_dense_peer, build_model
from modsquad_ds.model.flops import count_params, forward_macs
from modsquad_ds.moe import MoEAttention, MoEMlp


class _Wrap(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x, tasks=None):
        return self.m(x)


def test_dense_vit_matches_timms_own_count_including_attention():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                            embed_dim=64, depth=2, num_heads=4, num_classes=0)
    n, d, h = 17, 64, 256
    per_block = n * (3 * d * d + d * d + 2 * d * h) + 2 * n * n * d  # projections + QK^T and AV
    expected = 16 * 3 * 64 * 64 + 2 * per_block  # patch embedding + blocks
    assert forward_macs(_Wrap(vit), torch.randn(1, 3, 32, 32)) == expected


def test_moe_layers_count_only_active_experts():
    d, hidden, k, n = 16, 24, 2, 9
    mlp = MoEMlp(d, hidden, num_experts=6, top_k=k, num_tasks=2).eval()
    x = torch.randn(1, 1, n, d)
    macs = forward_macs(_Wrap(lambda x: mlp(x, torch.tensor([0]))), x)
    router = n * d * 6  # bmm with W_g; W_noise is not used in eval
    assert macs == router + n * k * 2 * d * hidden

    head = 8
    attn = MoEAttention(d, head, num_experts=5, top_k=k, num_tasks=2).eval()
    macs = forward_macs(_Wrap(lambda x: attn(x, torch.tensor([1]))), x)
    expected = n * d * 5 + n * d * 2 * head + n * k * 2 * d * head + 2 * (n * k) * n * head
    assert macs == expected


def test_base_preset_is_the_size_of_the_papers_table_2():
    cfg = load_config(preset="base", overrides=["tasks.names=[normal]"])
    ours, dense = build_model(cfg), build_dense_peer(cfg)
    # paper: Mod-Squad 201.3M vs MTL 90.0M (13 heads); ours with one head
    assert 185e6 < count_params(ours) < 205e6
    assert 85e6 < count_params(dense) < 90e6
    images = torch.randn(1, 3, 224, 224)
    assert forward_macs(dense, images) / 1e9 == pytest.approx(17.6, abs=0.2)  # ViT-B/16 + a linear head
    ratio = forward_macs(ours, images) / forward_macs(dense, images)
    assert 1.0 < ratio < 1.1  # paper: 19.7 / 18.5 = 1.065
