"""Task heads: the paper's single linear layers on Taskonomy.

- pixel tasks: a linear patch decoder, each patch token -> (patch x patch x C) values, un-patchified
  into a (C, H, W) map;
- classification tasks: a linear layer on the class token (or, ``model.class_head: mean_patch``, on
  the normalised mean of the patch tokens, as the authors' code).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from modsquad_ds.data.tasks import TaskSpec


class PixelHead(nn.Module):
    def __init__(self, dim: int, channels: int, patch_size: int, grid: int):
        super().__init__()
        self.channels, self.patch_size, self.grid = channels, patch_size, grid
        self.proj = nn.Linear(dim, patch_size * patch_size * channels)

    def forward(self, tokens_BND: torch.Tensor) -> torch.Tensor:
        b = tokens_BND.shape[0]
        p, g, c = self.patch_size, self.grid, self.channels
        y = self.proj(tokens_BND[:, 1:])  # drop the class token
        return y.view(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)


class ClassHead(nn.Module):
    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.proj = nn.Linear(dim, classes)

    def forward(self, tokens_BND: torch.Tensor) -> torch.Tensor:
        return self.proj(tokens_BND[:, 0])


class MeanPatchClassHead(nn.Module):
    """The authors' classification head: mean of the patch tokens, LayerNorm, linear
    (``model.class_head: mean_patch``)."""

    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.proj = nn.Linear(dim, classes)

    def forward(self, tokens_BND: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(tokens_BND[:, 1:].mean(dim=1)))


def make_head(spec: TaskSpec, dim: int, patch_size: int, grid: int, class_head: str = "cls_token") -> nn.Module:
    if spec.kind == "pixel":
        return PixelHead(dim, spec.channels, patch_size, grid)
    return MeanPatchClassHead(dim, spec.channels) if class_head == "mean_patch" else ClassHead(dim, spec.channels)
