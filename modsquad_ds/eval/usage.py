"""Expert usage per task and MoE layer, recorded during an evaluation: exact sums for all-reduce.

A :class:`RouteRecorder` hooks every :class:`~modsquad_ds.moe.router.TaskRouter` of a model (the
same router module serves ``MoEAttention``, ``MoEMlp`` and DeepSpeed's expert-parallel layer) and
adds, per layer, over real (non-padding) tokens:

- ``soft_TE``: sum of the routing probabilities P(e | x, t) (softmax over all experts);
- ``hard_TE``: number of top-k selections of expert e by task t;
- ``tokens_T``: tokens routed by task t;
- ``overlap_TT``: sum over tokens of |S_a(x) & S_b(x)| / k, where S_t(x) is the top-k expert set
  task t picks for token x. The task-batched forward routes the *same* token of the same image
  once per task slot, so this is the paper's task similarity numerator ("the fraction of experts
  two tasks share on the same input", Sec. 4.4 / Fig. A2-A4); ``overlap_tokens`` the denominator.

All are sums, so ``vector()`` -> one all-reduce -> ``load_vector()`` gives the numbers of one
process on the whole split. similarity.py turns them into frequencies, sharpness, MI and clusters.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import torch
import torch.nn as nn

from modsquad_ds.moe.router import RoutingResult, TaskRouter

_ROUTER_SUFFIX = re.compile(r"(\.deepspeed_moe\.gate)?\.router$")


def layer_name(router_path: str) -> str:
    """``blocks.1.mlp.deepspeed_moe.gate.router`` -> ``blocks.1.mlp`` (the layer's module path)."""
    return _ROUTER_SUFFIX.sub("", router_path)


class LayerUsage:
    def __init__(self, kind: str, num_tasks: int, num_experts: int, top_k: int):
        self.kind, self.top_k = kind, top_k
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        self.soft_TE, self.hard_TE = z(num_tasks, num_experts), z(num_tasks, num_experts)
        self.tokens_T, self.overlap_TT, self.overlap_tokens = z(num_tasks), z(num_tasks, num_tasks), z(1)

    def tensors(self) -> list[torch.Tensor]:
        return [self.soft_TE, self.hard_TE, self.tokens_T, self.overlap_TT, self.overlap_tokens]

    def to(self, device: torch.device) -> "LayerUsage":
        """Keep the sums where the routing is (no device-to-host copy, and sync, per router call)."""
        if self.soft_TE.device != device:
            self.soft_TE, self.hard_TE, self.tokens_T, self.overlap_TT, self.overlap_tokens = (
                t.to(device) for t in self.tensors())
        return self

    def add(self, r: RoutingResult, task_ids_T: torch.Tensor, weight_S: torch.Tensor) -> None:
        t, s, e = r.probs_TSE.shape
        device = r.probs_TSE.device
        self.to(device)
        ids = task_ids_T.detach().to(device, torch.long)
        w = weight_S.to(device, torch.float64)
        probs = r.probs_TSE.detach().to(torch.float64)
        chosen_TSE = torch.zeros(t, s, e, dtype=torch.float64, device=device).scatter_(
            2, r.topk_ids_TSK.detach().long(), 1.0)
        self.soft_TE.index_add_(0, ids, torch.einsum("tse,s->te", probs, w))
        self.hard_TE.index_add_(0, ids, torch.einsum("tse,s->te", chosen_TSE, w))
        self.tokens_T.index_add_(0, ids, w.sum().expand(t).clone())
        pair = torch.einsum("ase,bse,s->ab", chosen_TSE, chosen_TSE, w) / self.top_k
        self.overlap_TT[ids[:, None], ids[None, :]] += pair
        self.overlap_tokens += w.sum()


class RouteRecorder:
    """Context manager: hooks the routers of ``model`` while it is active.

    Set :attr:`sample_weight` (``(B,)``, 1 real / 0 padding) before each forward; tokens inherit
    their image's weight (router inputs are ``(T, B*N, D)``, image-major within a slot).
    """

    def __init__(self, model: nn.Module, task_names: Sequence[str]):
        self.model = model
        self.task_names = list(task_names)
        self.layers: dict[str, LayerUsage] = {}
        self.sample_weight: Optional[torch.Tensor] = None
        self._handles = []

    def __enter__(self) -> "RouteRecorder":
        for path, module in self.model.named_modules():
            if isinstance(module, TaskRouter):
                name = layer_name(path)
                kind = "attn" if name.endswith("attn") else "mlp"
                self.layers.setdefault(name, LayerUsage(kind, len(self.task_names), module.num_experts,
                                                        module.top_k))
                self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, name: str):
        def hook(module, inputs, output: RoutingResult):
            task_ids_T = inputs[1]
            s = output.probs_TSE.shape[1]
            if self.sample_weight is None:
                weight_S = torch.ones(s, device=output.probs_TSE.device)
            else:
                b = self.sample_weight.numel()
                weight_S = self.sample_weight.detach().repeat_interleave(s // b)
            self.layers[name].add(output, task_ids_T, weight_S)
        return hook

    def vector(self) -> torch.Tensor:
        """Every sum in one float64 vector on the CPU (once per evaluation), for the all-reduce."""
        parts = [t.reshape(-1).cpu() for name in sorted(self.layers) for t in self.layers[name].tensors()]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)

    def load_vector(self, vec: torch.Tensor) -> None:
        """Put reduced sums back, on the CPU (where similarity.py reads them)."""
        vec, pos = vec.detach().cpu().to(torch.float64), 0
        for name in sorted(self.layers):
            for t in self.layers[name].to(torch.device("cpu")).tensors():
                t.copy_(vec[pos:pos + t.numel()].view_as(t))
                pos += t.numel()
