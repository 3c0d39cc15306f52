"""The standalone per-task model an export writes: one task's path through a trained Mod-Squad.

A :class:`TaskViT` is the trained ``ModSquadViT`` restricted to one task: its routers, its task
embedding and its head, and in every MoE layer only the experts the task kept (paper Sec. 3.4,
"extracting a small sub-network per task"). It is built from a plain JSON-able config (see
:func:`task_config`) and loads from one safetensors file; neither DeepSpeed nor the run's
config is needed at inference::

    model = TaskViT.from_file("export/depth_zbuffer.safetensors")
    model = timm.create_model("modsquad_task_vit", pretrained=True,
                              pretrained_cfg_overlay=dict(file="export/depth_zbuffer.safetensors"))
    pred = model(images_BCHW)       # the task's prediction: (B, C, H, W) maps or (B, classes) logits

Routing after pruning: a pruned layer's router still computes the logits of *all* E experts of the
trained layer (D x E weights, a few thousand parameters) so that each gate keeps its trained value,
the softmax over all experts, un-renormalised (paper eq. 2). Only kept experts can be chosen; a layer
that kept fewer experts than its top-k uses all of them (top-k lowered). With every expert the task
ever chose on some data kept, the outputs on that data equal the full model's (tested).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models import register_model

from modsquad_ds.data.tasks import get_task
from modsquad_ds.model.blocks import Block, DenseAttention, DenseMlp
from modsquad_ds.model.heads import make_head
from modsquad_ds.moe.attention import MoEAttention
from modsquad_ds.moe.layer import MoEMlp
from modsquad_ds.moe.router import RoutingResult

FORMAT = "modsquad_task_vit/1"
CONFIG_KEY = "modsquad_task_vit_config"
"""safetensors metadata key holding the config JSON, so one file is a whole model."""


class PrunedRouter(nn.Module):
    """One task's router of a pruned MoE layer: logits over all ``num_experts`` trained experts,
    top-k among the ``kept`` ones (returned ids index ``kept``)."""

    def __init__(self, dim: int, num_experts: int, kept: list[int], top_k: int):
        super().__init__()
        if not kept or top_k < 1 or top_k > len(kept):
            raise ValueError(f"need 1 <= top_k ({top_k}) <= kept experts ({len(kept)})")
        self.top_k = top_k
        self.num_all_experts = num_experts
        self.weight = nn.Parameter(torch.zeros(dim, num_experts))
        self.register_buffer("kept", torch.tensor(kept, dtype=torch.long), persistent=False)

    @property
    def num_tasks(self) -> int:
        return 1

    def forward(self, x_TSD: torch.Tensor, task_ids_T: torch.Tensor) -> RoutingResult:
        logits = x_TSD.float() @ self.weight.float()
        probs = logits.softmax(dim=-1)[..., self.kept]  # gates as trained: softmax over all experts
        gates, topk_ids = probs.topk(self.top_k, dim=-1)
        return RoutingResult(logits[..., self.kept], probs, topk_ids, gates)


def _attention(spec: dict, dim: int, qkv_bias: bool) -> nn.Module:
    if spec["type"] == "dense":
        return DenseAttention(dim, spec["num_heads"], qkv_bias)
    layer = MoEAttention(dim, spec["head_dim"], len(spec["kept"]), spec["top_k"], 1, noisy=False, kv_bias=qkv_bias)
    layer.router = PrunedRouter(dim, spec["num_experts"], spec["kept"], spec["top_k"])
    return layer


def _mlp(spec: dict, dim: int) -> nn.Module:
    if spec["type"] == "dense":
        return DenseMlp(dim, spec["hidden"])
    layer = MoEMlp(dim, spec["hidden"], len(spec["kept"]), spec["top_k"], 1, noisy=False)
    layer.router = PrunedRouter(dim, spec["num_experts"], spec["kept"], spec["top_k"])
    return layer


class TaskViT(nn.Module):
    """One task's pruned Mod-Squad ViT; ``forward(images)`` returns the task's prediction."""

    def __init__(self, config: dict):
        super().__init__()
        if config.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} config (format {config.get('format')!r})")
        self.config = config
        self.task = config["task"]
        d, patch, img = config["embed_dim"], config["patch_size"], config["img_size"]
        self.first_block = config["first_block"]
        self.patch_embed = PatchEmbed(img, patch, config["in_chans"], d)
        grid = img // patch
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, d))
        self.task_embed = nn.Parameter(torch.zeros(d))
        self.blocks = nn.ModuleList(
            Block(d, _attention(b["attn"], d, config["qkv_bias"]), _mlp(b["mlp"], d)) for b in config["blocks"])
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head = make_head(get_task(self.task), d, patch, grid)
        for name, module in self.named_modules():
            if isinstance(module, (MoEAttention, MoEMlp)):
                module.name = name
        self.eval()

    def forward_features(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Final-norm tokens (B, N, D) of the task."""
        x = self.patch_embed(images_BCHW)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x_1BND = x.unsqueeze(0)
        for block in self.blocks[: self.first_block]:
            x_1BND, _ = block(x_1BND, None)
        task_ids_T = torch.zeros(1, dtype=torch.long, device=x.device)
        for block in self.blocks[self.first_block:]:
            x_1BND, _ = block(x_1BND + self.task_embed, task_ids_T)  # task embedding before every block (eq. 4)
        return self.norm(x_1BND[0])

    def forward(self, images_BCHW: torch.Tensor, tasks=None) -> torch.Tensor:
        # ``tasks`` is accepted and ignored so that the FLOP counter's model(images, tasks) call works
        return self.head(self.forward_features(images_BCHW))

    @classmethod
    def from_file(cls, path: str | Path, device: str | torch.device = "cpu") -> "TaskViT":
        """Build and load from an exported safetensors file (its config sits in the file's metadata)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if CONFIG_KEY not in meta:
            sidecar = path.with_suffix(".json")
            if not sidecar.is_file():
                raise ValueError(f"{path}: no {CONFIG_KEY} metadata and no {sidecar.name} beside it")
            config = json.loads(sidecar.read_text())
        else:
            config = json.loads(meta[CONFIG_KEY])
        model = cls(config)
        model.load_state_dict(load_file(str(path), device=str(device)), strict=True)
        return model.to(device).eval()


def task_config(model_cfg, moe_cfg, task: str, layers: dict[str, dict], first_block: int) -> dict:
    """The JSON config of one task's model. ``layers``: per MoE layer path (``blocks.{i}.attn`` /
    ``blocks.{i}.mlp``) ``{"num_experts", "kept", "top_k"}``; layers not listed are dense."""
    from modsquad_ds.model.vit import block_kinds

    d = model_cfg.embed_dim
    blocks = []
    for i, (moe_attn, moe_mlp) in enumerate(block_kinds(model_cfg.depth, moe_cfg)):
        attn = ({"type": "moe", "head_dim": moe_cfg.attn.resolved_dim(d), **layers[f"blocks.{i}.attn"]}
                if moe_attn else {"type": "dense", "num_heads": model_cfg.num_heads})
        mlp = ({"type": "moe", "hidden": moe_cfg.mlp.resolved_dim(model_cfg.mlp_hidden), **layers[f"blocks.{i}.mlp"]}
               if moe_mlp else {"type": "dense", "hidden": model_cfg.mlp_hidden})
        blocks.append({"attn": attn, "mlp": mlp})
    return {"format": FORMAT, "task": task, "img_size": model_cfg.img_size, "patch_size": model_cfg.patch_size,
            "in_chans": model_cfg.in_chans, "embed_dim": d, "qkv_bias": model_cfg.qkv_bias,
            "first_block": first_block, "blocks": blocks}


@register_model
def modsquad_task_vit(pretrained: bool = False, pretrained_cfg_overlay: Optional[dict] = None,
                      config: Optional[dict] = None, **unused) -> TaskViT:
    """timm entry point: ``timm.create_model("modsquad_task_vit", pretrained=True,
    pretrained_cfg_overlay=dict(file="export/<task>.safetensors"))`` loads an exported task model;
    ``config=<dict>`` alone builds an untrained one of that shape."""
    file = (pretrained_cfg_overlay or {}).get("file")
    if pretrained:
        if not file:
            raise ValueError("modsquad_task_vit loads local files only: pass pretrained_cfg_overlay=dict(file=...)")
        return TaskViT.from_file(file)
    if config is None:
        raise ValueError("modsquad_task_vit needs config=<task model config> or pretrained=True with a file")
    return TaskViT(config)
