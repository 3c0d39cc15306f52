"""The Mod-Squad vision transformer (paper Fig. 2): a ViT whose blocks hold MoE attention and MoE
MLP layers with one router per task, a learned task embedding, and one head per task.

Task-batched forward: an image batch is embedded once, the task-independent prefix (blocks before
``moe.first_block``) runs once, then the hidden states are replicated into T task slots
(``x_TBND``) and every later block processes all slots in one pass, each slot routed by its task's
routers. The result equals T separate single-task forwards (tested).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from timm.layers import PatchEmbed, trunc_normal_

from modsquad_ds.config.schema import ModelConfig, MoEConfig
from modsquad_ds.data.tasks import get_task
from modsquad_ds.model.blocks import Block, DenseAttention, DenseMlp
from modsquad_ds.model.heads import make_head
from modsquad_ds.model.output import ModelOutput
from modsquad_ds.moe.attention import MoEAttention
from modsquad_ds.moe.layer import MoEMlp
from modsquad_ds.moe.router import TaskRouter

TaskSelector = Union[None, Sequence[str], Sequence[int], torch.Tensor]


def block_kinds(depth: int, moe: MoEConfig) -> list[tuple[bool, bool]]:
    """(moe_attention, moe_mlp) for each block, following ``moe.placement``."""
    kinds = []
    for i in range(depth):
        j = i - moe.first_block
        if j < 0:
            attn, mlp = False, False
        elif moe.placement == "every":
            attn, mlp = True, True
        else:  # alternate, as in the reference code: MoA + dense MLP, then dense attention + MoE MLP
            attn, mlp = j % 2 == 0, j % 2 == 1
        kinds.append((attn and moe.attn.enabled, mlp and moe.mlp.enabled))
    return kinds


class ModSquadViT(nn.Module):
    def __init__(self, model: ModelConfig, moe: MoEConfig, task_names: Sequence[str]):
        super().__init__()
        self.task_names = list(task_names)
        self.first_block = moe.first_block
        self.grad_checkpointing = model.grad_checkpointing
        d, num_tasks = model.embed_dim, len(self.task_names)
        self.patch_embed = PatchEmbed(model.img_size, model.patch_size, model.in_chans, d)
        grid = model.img_size // model.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, d))
        self.task_embed = nn.Parameter(torch.zeros(num_tasks, d))

        drop_rates = torch.linspace(0, model.drop_path_rate, model.depth).tolist()
        attn_dim = moe.attn.resolved_dim(d)
        mlp_dim = moe.mlp.resolved_dim(model.mlp_hidden)
        blocks = []
        for i, (moe_attn, moe_mlp) in enumerate(block_kinds(model.depth, moe)):
            wide = moe.wide_dense_attention and moe_mlp  # the authors' odd blocks
            attn = (MoEAttention(d, attn_dim, moe.attn.num_experts, moe.attn.top_k, num_tasks,
                                 moe.router_noise, moe.noise_epsilon, model.qkv_bias)
                    if moe_attn else DenseAttention(d, model.num_heads, model.qkv_bias,
                                                    2 * d // model.num_heads if wide else None))
            mlp = (MoEMlp(d, mlp_dim, moe.mlp.num_experts, moe.mlp.top_k, num_tasks,
                          moe.router_noise, moe.noise_epsilon)
                   if moe_mlp else DenseMlp(d, model.mlp_hidden))
            blocks.append(Block(d, attn, mlp, drop_rates[i]))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.heads = nn.ModuleDict(
            {name: make_head(get_task(name), d, model.patch_size, grid, model.class_head) for name in self.task_names})
        self._init_weights()
        for module in self.modules():
            if isinstance(module, TaskRouter):
                module.noise_at_eval = moe.eval_noise
        for name, module in self.named_modules():
            if isinstance(module, (MoEAttention, MoEMlp)):
                module.name = name

    def _init_weights(self) -> None:
        # timm's ViT init: truncated normal(0.02) for linear weights and position embedding.
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        trunc_normal_(self.task_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW must not decay (timm's hook, which its optimizer factory reads too): the
        positional, class-token and task embeddings, whose pull towards zero would fade position and
        task signals rather than regularise; 1-D weights (biases, norms) are left out by the optimizer."""
        return {"pos_embed", "cls_token", "task_embed"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch: recompute every block in backward (``model.grad_checkpointing``)."""
        self.grad_checkpointing = enable

    def compile_blocks(self) -> None:
        """``torch.compile`` each block in place (``model.compile``): the module tree, parameter names
        and state dict stay as they are, unlike wrapping the model (``_orig_mod.`` prefixes)."""
        for block in self.blocks:
            block.compile()

    def _run_block(self, block: Block, x_TBND: torch.Tensor, task_ids_T: Optional[torch.Tensor]):
        if self.grad_checkpointing and torch.is_grad_enabled():
            # Non-reentrant checkpoint: restores the RNG state (router noise, drop path) for the
            # recomputation, and returns the block's RoutingStats with their autograd history.
            return checkpoint(block, x_TBND, task_ids_T, use_reentrant=False)
        return block(x_TBND, task_ids_T)

    def task_ids(self, tasks: TaskSelector = None) -> torch.Tensor:
        return self._select(tasks)[1]

    def _select(self, tasks: TaskSelector) -> tuple[list[str], torch.Tensor]:
        """The selected tasks' names (on the host) and ids (on the model's device). Only a selection
        given as a device tensor is read back; the usual ones (all tasks, names) cost no host sync."""
        device = self.task_embed.device
        if tasks is None:
            return list(self.task_names), torch.arange(len(self.task_names), device=device)
        if isinstance(tasks, torch.Tensor):
            ids_T = tasks.to(device=device, dtype=torch.long)
            return [self.task_names[i] for i in ids_T.tolist()], ids_T
        ids = [self.task_names.index(t) if isinstance(t, str) else int(t) for t in tasks]
        # torch.tensor(ids, device=cuda) would wait for the GPU's queued work (a blocking copy) in
        # every forward of predict (a run's full model); from pinned memory the copy just joins the queue
        ids_T = torch.tensor(ids, dtype=torch.long)
        if device.type == "cuda":
            ids_T = ids_T.pin_memory()
        return [self.task_names[i] for i in ids], ids_T.to(device, non_blocking=True)

    def embed(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Task-independent prefix: patches, class token, positions, dense blocks before MoE."""
        x = self.patch_embed(images_BCHW)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x_1BND = x.unsqueeze(0)
        for block in self.blocks[: self.first_block]:
            x_1BND, _ = self._run_block(block, x_1BND, None)
        return x_1BND

    def forward_features(self, images_BCHW: torch.Tensor, task_ids_T: torch.Tensor):
        x_1BND = self.embed(images_BCHW)
        x_TBND = x_1BND.expand(len(task_ids_T), -1, -1, -1)
        task_vec_T11D = self.task_embed[task_ids_T][:, None, None, :]
        routing = []
        for block in self.blocks[self.first_block:]:
            # The reference code adds the task embedding to the tokens before every block (eq. 4).
            x_TBND, stats = self._run_block(block, x_TBND + task_vec_T11D, task_ids_T)
            routing.extend(stats)
        return self.norm(x_TBND), routing

    def forward(self, images_BCHW: torch.Tensor, tasks: TaskSelector = None) -> ModelOutput:
        names, task_ids_T = self._select(tasks)
        x_TBND, routing = self.forward_features(images_BCHW, task_ids_T)
        preds = {name: self.heads[name](x_TBND[slot]) for slot, name in enumerate(names)}
        return ModelOutput(preds, routing)
