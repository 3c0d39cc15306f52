"""Which expert kernel runs (moe/kernels.py): ``grouped_mm`` only where its 16-byte stride rule holds
for both expert widths, in and out (forward and backward read rows of each)."""

import pytest
import torch

from modsquad_ds.moe import MoEAttention, MoEMlp, kernels

pytestmark = pytest.mark.skipif(not kernels.has_grouped_mm(), reason="no grouped_mm in this torch")


@pytest.fixture
def fused_kernel_everywhere(monkeypatch):
    """``auto`` as on an sm90+ GPU: the fused grouped kernel reported present for every device."""
    monkeypatch.setattr(kernels, "grouped_supported", lambda device_type, index, dtype: True)


@pytest.mark.parametrize("width_in, width_out, expected", [(64, 128, "grouped"), (64, 100, "loop"),
                                                           (76, 64, "loop"), (64, None, "grouped")])
def test_auto_takes_grouped_only_for_aligned_widths(fused_kernel_everywhere, width_in, width_out, expected):
    x = torch.zeros(4, width_in, dtype=torch.bfloat16)  # 8 bf16 values = 16 bytes
    assert kernels.resolve("auto", x, width_out) == expected


def test_explicit_grouped_names_the_misaligned_width():
    with pytest.raises(ValueError, match=r"multiples of 8 in torch.bfloat16 .* got 64 and 76; use kernel 'loop'"):
        kernels.resolve("grouped", torch.zeros(4, 64, dtype=torch.bfloat16), 76)


@pytest.mark.parametrize("layer", [lambda: MoEAttention(64, 20, 4, 2, num_tasks=2),  # head width 20
                                   lambda: MoEMlp(64, 100, 4, 2, num_tasks=2)])       # expert hidden 100
def test_layers_with_unaligned_expert_widths_train_under_auto(fused_kernel_everywhere, layer):
    """A config whose head width or expert hidden size is not a multiple of 8 (small with
    moe.attn.top_k=5: 76) trains where the grouped kernel exists, instead of failing in its first step
    (grouped_mm on the CPU enforces the same stride rule as on the GPU)."""
    torch.manual_seed(0)
    m = layer().to(torch.bfloat16)
    x = torch.randn(2, 1, 8, 64, dtype=torch.bfloat16, requires_grad=True)
    y, _ = m(x, torch.tensor([0, 1]))
    y.float().square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()
