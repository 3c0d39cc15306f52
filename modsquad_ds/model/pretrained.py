"""Initialise the dense parts of a Mod-Squad model from a dense timm ViT checkpoint on local disk.

Users start from DeiT / MAE / AugReg weights they downloaded once; nothing is fetched at run time.
Patch embedding, class token, position embedding (resampled when the grid differs), norms, and the
attention / MLP weights of blocks that are dense in our model are copied. MoE experts, routers,
task embedding and heads keep their fresh initialisation. Loading is safe: safetensors, or
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed

from modsquad_ds.model.blocks import DenseAttention, DenseMlp
from modsquad_ds.model.vit import ModSquadViT


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    """Our parameter names that were filled from the checkpoint."""
    unused: list[str] = field(default_factory=list)
    """Checkpoint keys with no dense counterpart in our model (e.g. MLPs of MoE blocks)."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.pretrained: checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict", "module"):  # DeiT / MAE / Lightning style wrappers
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _target_names(model: ModSquadViT) -> dict[str, str]:
    """timm ViT key -> our parameter name, for every dense part of our model."""
    mapping = {"cls_token": "cls_token", "pos_embed": "pos_embed", "norm.weight": "norm.weight",
               "norm.bias": "norm.bias", "patch_embed.proj.weight": "patch_embed.proj.weight",
               "patch_embed.proj.bias": "patch_embed.proj.bias"}
    for i, block in enumerate(model.blocks):
        for part in ("norm1", "norm2"):
            for p in ("weight", "bias"):
                mapping[f"blocks.{i}.{part}.{p}"] = f"blocks.{i}.{part}.{p}"
        if isinstance(block.attn, DenseAttention):
            for layer in ("qkv", "proj"):
                for p in ("weight", "bias"):
                    mapping[f"blocks.{i}.attn.{layer}.{p}"] = f"blocks.{i}.attn.attn.{layer}.{p}"
        if isinstance(block.mlp, DenseMlp):
            for layer in ("fc1", "fc2"):
                for p in ("weight", "bias"):
                    mapping[f"blocks.{i}.mlp.{layer}.{p}"] = f"blocks.{i}.mlp.mlp.{layer}.{p}"
    return mapping


@torch.no_grad()
def load_dense_checkpoint(model: ModSquadViT, path: str | Path) -> LoadReport:
    state = read_state_dict(path)
    params = dict(model.named_parameters())
    mapping = _target_names(model)
    report = LoadReport()
    for key, value in state.items():
        ours = mapping.get(key)
        if ours is None or ours not in params:
            report.unused.append(key)
            continue
        target = params[ours]
        if key == "pos_embed" and value.shape != target.shape:
            grid = int((target.shape[1] - 1) ** 0.5)
            value = resample_abs_pos_embed(value, new_size=(grid, grid), num_prefix_tokens=1)
        if value.shape != target.shape:
            raise ValueError(f"model.pretrained: {key} has shape {tuple(value.shape)} in {path}, "
                             f"the model needs {tuple(target.shape)} (is model.embed_dim right?)")
        target.copy_(value.to(target.dtype))
        report.loaded.append(ours)
    if not report.loaded:
        raise ValueError(f"model.pretrained: {path} holds no ViT weights this model can use")
    return report
