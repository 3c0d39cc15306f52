"""Expert-parallel MoE MLP on DeepSpeed's native MoE: the one place that touches ``deepspeed.moe``.

:class:`ExpertParallelMoEMlp` *is* a ``deepspeed.moe.layer.MoE`` (the engine finds MoE layers by
``isinstance``), so DeepSpeed's machinery applies unchanged: its expert-parallel and
expert-data-parallel process groups, its gradient reduction (expert grads over the expert-data-parallel
group, divided by the data-parallel world size), its optimizer parameter groups
(:func:`moe_param_groups`) and its checkpoint files, one per MoE layer L and *global* expert id E:
``layer_{L}_expert_{E}_mp_rank_00_model_states.pt`` (L counts MoE MLP layers in module order, not
blocks). It keeps :class:`~modsquad_ds.moe.layer.MoEMlp`'s calling convention,
``(x_TBND, task_ids_T) -> (y_TBND, RoutingStats)``, so the model code does not change:
:func:`convert_to_expert_parallel` swaps the layers of a built model from outside.

At ep_size 1 there is nothing to exchange, and the layer does not enter DeepSpeed's ``MOELayer``: it
runs ``MoEMlp``'s dropless dispatch (moe/layer.dropless_moe) over the same expert modules, so no
capacity is read back to the host, no ``(E, C, D)`` buffer is padded to the busiest expert, and on
sm90+ GPUs in bf16 the experts are one ``grouped_mm``. Parameters, groups and checkpoint files are
DeepSpeed's either way (``local_dispatch = False`` takes DeepSpeed's path; its tests do).

What is ours inside DeepSpeed's ``MOELayer`` (gate -> sparse encode -> all-to-all -> experts ->
all-to-all -> sparse decode), at ep_size > 1:

- the gate, :class:`TaskGate`, wraps our per-task :class:`~modsquad_ds.moe.router.TaskRouter` (the same
  module, same math, same noise draw as ``MoEMlp``) and answers the 0.19.4+ gate contract
  ``gate(reshaped_input, used_token, sparse_routes, use_tutel) -> (l_aux, capacity, num_experts,
  indices[k,S], locations[k,S], gates[k,S], exp_counts)``. ``MOELayer`` hands its second input to the
  gate untouched and uses it nowhere else; we pass ``task_ids_T`` there, and the gate reads the token
  rows as ``T`` task slots of equal length (the task-major layout of ``x_TBND``).
- dropless capacity. DeepSpeed's all-to-all exchanges an ``(E, C, D)`` buffer of the same shape on every
  rank of the expert-parallel group, so ``C`` must be equal across the group. We take ``C`` = the
  largest per-expert token count on any rank of the group (one scalar all-reduce MAX per layer
  call, DeepSpeed's own ``drop_tokens=False`` rule), the smallest capacity that drops nothing.
  ``C = S`` (all local tokens) would need no communication but would run the experts on
  ``E * S`` rows instead of about ``k * S``: 4x the expert FLOPs for 8 experts top-2 or 16 top-4.
  Nothing is ever dropped, whatever the ranks' token counts, so results equal the single-process
  ``MoEMlp`` to float32 rounding (the padded rows are zeros whose outputs are never read and add
  nothing to the expert gradients).
- the experts are DeepSpeed ``Experts`` holding timm ``Mlp`` modules, as ``MLPExperts`` does; local
  expert ``i`` on expert-parallel rank ``r`` is global expert ``r * E / ep_size + i``.
- ``l_aux`` is 0: the MI / balance losses come from the returned ``RoutingStats``.

Constraints: every rank of an expert-parallel group must call every MoE MLP layer the same number of
times (forward all-reduce and all-to-alls); evaluate on all ranks, or convert back first with
:func:`convert_to_single_process`. Convert before building the optimizer and the engine.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from deepspeed.moe.experts import Experts
from deepspeed.moe.layer import MoE
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import groups
from timm.layers import Mlp

from modsquad_ds.moe import kernels
from modsquad_ds.moe.dispatch import sort_by_expert
from modsquad_ds.moe.experts import run_mlp_experts
from modsquad_ds.moe.layer import MoEMlp, dropless_moe
from modsquad_ds.moe.router import RoutingResult, TaskRouter
from modsquad_ds.moe.stats import RoutingStats, routing_stats

__all__ = ["TaskGate", "BatchedExperts", "ExpertParallelMoEMlp", "convert_to_expert_parallel", "convert_to_single_process",
           "expert_parallel_layers", "moe_param_groups", "reference_key", "expert_parallel_key",
           "expert_checkpoint_name", "clip_grad_norm_", "is_expert_param"]

_DS_EXPERTS = "deepspeed_moe.experts.deepspeed_experts"
_DS_ROUTER = "deepspeed_moe.gate.router"


class TaskGate(nn.Module):
    """DeepSpeed gate (0.19.4+ contract) that routes each token by its task's router, dropless.

    Holds the :class:`TaskRouter` as ``router`` (parameters ``task_wg`` / ``task_wnoise``: no
    "expert" in their names, which DeepSpeed's checkpointing would take for expert weights).
    The last routing is kept in ``routing`` until the layer pops it for its ``RoutingStats``.
    """

    def __init__(self, router: TaskRouter):
        super().__init__()
        self.router = router
        self.num_experts = router.num_experts
        self.k = router.top_k
        self.ep_group = None
        self.routing: Optional[RoutingResult] = None

    def _set_ep_group(self, ep_group) -> None:
        # DeepSpeed's TopKGate asserts it is set once; the engine sets it again after
        # convert_to_expert_parallel has (with the same group), and a second engine again.
        self.ep_group = ep_group

    def forward(self, reshaped_input: torch.Tensor, used_token: Optional[torch.Tensor] = None,
                sparse_routes: bool = True, use_tutel: bool = False):
        if used_token is None or used_token.dim() != 1 or used_token.dtype not in (torch.int64, torch.int32):
            raise ValueError("TaskGate needs the task id of every task slot (task_ids_T, a 1-D integer "
                             "tensor) as MOELayer's second input; call ExpertParallelMoEMlp(x_TBND, task_ids_T)")
        if not sparse_routes or use_tutel:
            raise NotImplementedError("TaskGate implements the sparse-route gate contract of DeepSpeed 0.19.4+ only")
        task_ids_T = used_token.long()
        s_total, d = reshaped_input.shape
        t = task_ids_T.numel()
        if s_total % t:
            raise ValueError(f"{s_total} tokens do not split into {t} equal task slots")
        r = self.router(reshaped_input.view(t, s_total // t, d), task_ids_T)
        self.routing = r
        e, k = self.num_experts, self.k
        ids_SK = r.topk_ids_TSK.reshape(s_total, k)
        gates_SK = r.gates_TSK.reshape(s_total, k)
        locations_SK, counts_E = _locations(ids_SK, e)
        capacity = counts_E.max()  # tokens pick distinct experts, so this is at most S
        if self.ep_group is not None and dist.get_world_size(self.ep_group) > 1:
            dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=self.ep_group)
        l_aux = reshaped_input.new_zeros((), dtype=torch.float32)
        return (l_aux, capacity, e, ids_SK.t().to(torch.int32).contiguous(),
                locations_SK.t().to(torch.int32).contiguous(), gates_SK.t().contiguous(), counts_E)


def _locations(ids_SK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Position of each (token, choice) among its expert's slots, in token order; and the counts.

    The dispatch plan's stable sort by expert (moe/dispatch.py) instead of DeepSpeed's ``cumsum`` over
    a one-hot ``(S*K, E)`` mask: O(S K log) memory-light, same result, no host sync.
    """
    flat = ids_SK.reshape(-1)
    order, counts = sort_by_expert(flat, num_experts)
    starts = torch.cumsum(counts, 0) - counts
    pos_sorted = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    locations = torch.empty_like(flat)
    locations[order] = pos_sorted
    return locations.view_as(ids_SK), counts


class BatchedExperts(kernels.KernelChoice, Experts):
    """DeepSpeed's ``Experts`` (same ``deepspeed_experts.{i}`` modules, names and group attributes),
    run as two batched matmuls over the local experts instead of a Python loop.

    ``MOELayer`` hands the experts an equal-capacity ``(ep_size, E_local, C, D)`` buffer, so every
    local expert sees the same number of rows: ``baddbmm`` over ``E_local`` does them all at once.
    Padded rows are zeros whose outputs are never read, so they add nothing to any gradient, exactly
    as in the loop. The loop (DeepSpeed's ``forward``) remains for experts that are not a plain
    two-layer timm ``Mlp`` (``batched = False`` forces it). ``kernel`` is the expert kernel of the
    layer's local path at ep_size 1 (:meth:`ExpertParallelMoEMlp.forward`).
    """

    def __init__(self, expert: nn.Module, num_local_experts: int = 1, expert_group_name: Optional[str] = None):
        super().__init__(expert, num_local_experts, expert_group_name)
        self.batched = isinstance(expert, Mlp) and isinstance(expert.norm, nn.Identity)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if not self.batched:
            return super().forward(inputs)
        ep, e, c, d = inputs.shape
        x_EMD = inputs.transpose(0, 1).reshape(e, ep * c, d)
        first = self.deepspeed_experts[0]
        h = _batched_linear(x_EMD, [m.fc1 for m in self.deepspeed_experts])
        h = first.norm(first.drop1(first.act(h)))
        y = first.drop2(_batched_linear(h, [m.fc2 for m in self.deepspeed_experts]))
        return y.view(e, ep, c, -1).transpose(0, 1)


def _batched_linear(x_EMI: torch.Tensor, linears: list[nn.Linear]) -> torch.Tensor:
    w_EIO = torch.stack([m.weight for m in linears]).transpose(1, 2)
    if linears[0].bias is None:
        return torch.bmm(x_EMI, w_EIO)
    return torch.baddbmm(torch.stack([m.bias for m in linears]).unsqueeze(1), x_EMI, w_EIO)


class ExpertParallelMoEMlp(MoE):
    """``MoEMlp`` on DeepSpeed's ``MoE``: same forward, experts sharded over ``ep_size`` ranks."""

    kind = "mlp"

    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int, num_tasks: int,
                 ep_size: int = 1, noisy: bool = True, noise_epsilon: float = 1e-2,
                 router: Optional[TaskRouter] = None):
        if top_k > num_experts:
            raise ValueError(f"top_k ({top_k}) must be <= num_experts ({num_experts})")
        # MoE builds DeepSpeed's Experts (deep copies of this Mlp, marked allreduce=False with the
        # group name ep_size_{ep_size}) and a TopKGate that we replace; k=1 only to build the latter.
        super().__init__(hidden_size=dim, expert=Mlp(dim, hidden, act_layer=nn.GELU), num_experts=num_experts,
                         ep_size=ep_size, k=1, drop_tokens=False, use_rts=False)
        self.top_k = top_k
        # the same modules and names as DeepSpeed's Experts, run batched (BatchedExperts)
        self.deepspeed_moe.experts = BatchedExperts(self.local_experts[0], self.num_local_experts,
                                                    self.expert_group_name)
        self.deepspeed_moe.gate = TaskGate(router or TaskRouter(dim, num_experts, top_k, num_tasks, noisy,
                                                                 noise_epsilon))
        self.name = "mlp"  # set by convert_to_expert_parallel to the module path
        self.local_dispatch = True
        """At ep_size 1, route with MoEMlp's dropless dispatch instead of DeepSpeed's MOELayer (same
        results, same modules and checkpoint files); False runs DeepSpeed's path (its tests)."""

    @property
    def router(self) -> TaskRouter:
        return self.deepspeed_moe.gate.router

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.deepspeed_moe.experts.deepspeed_experts

    @property
    def ep_rank(self) -> int:
        if self.ep_size == 1:
            return 0
        return groups._get_expert_parallel_rank(self.expert_group_name)

    def global_expert_ids(self) -> list[int]:
        first = self.ep_rank * self.num_local_experts
        return list(range(first, first + self.num_local_experts))

    def forward(self, x_TBND: torch.Tensor, task_ids_T: torch.Tensor) -> tuple[torch.Tensor, RoutingStats]:
        if self.ep_size == 1 and self.local_dispatch:
            # Nothing to exchange: MoEMlp's dropless dispatch over the same expert modules (no
            # capacity, so no host sync for it and no padded (E, C, D) buffer; grouped_mm on sm90+).
            kernel = self.deepspeed_moe.experts.kernel
            return dropless_moe(self.router, lambda x_SD, p: run_mlp_experts(self.local_experts, x_SD, p, kernel),
                                self.num_local_experts, x_TBND, task_ids_T, self.name, self.kind)
        y_TBND, _, _ = super().forward(x_TBND, task_ids_T)
        r, self.deepspeed_moe.gate.routing = self.deepspeed_moe.gate.routing, None
        stats = routing_stats(self.name, self.kind, r.probs_TSE, r.topk_ids_TSK, task_ids_T.to(r.probs_TSE.device),
                              self.router.num_tasks)
        return y_TBND, stats


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, new)


def expert_parallel_layers(model: nn.Module) -> list[tuple[str, ExpertParallelMoEMlp]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ExpertParallelMoEMlp)]


def convert_to_expert_parallel(model: nn.Module, ep_size: int = 1,
                               use_data_before_expert_parallel: bool = False) -> nn.Module:
    """Swap every :class:`MoEMlp` of ``model`` (in place) for an :class:`ExpertParallelMoEMlp`.

    Each rank keeps the weights of the global experts it owns and shares the router module, so a model
    built with the same seed on every rank becomes, over the expert-parallel group, exactly the
    single-process model. ``ep_size > 1`` needs ``deepspeed.init_distributed`` first: the expert groups
    are created here (as the engine would, ``use_data_before_expert_parallel`` as in the DeepSpeed
    config) to know which experts this rank owns. Call before building the optimizer and engine.
    """
    if ep_size < 1:
        raise ValueError(f"ep_size must be >= 1, got {ep_size}")
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if ep_size > 1 and world == 1:
        raise ValueError(f"ep_size {ep_size} needs a process group of at least {ep_size} ranks "
                         "(call deepspeed.init_distributed first)")
    if world % ep_size:
        raise ValueError(f"ep_size ({ep_size}) must divide the world size ({world})")
    for path, old in [(n, m) for n, m in model.named_modules() if isinstance(m, MoEMlp)]:
        experts = old.experts.experts
        if len(experts) % ep_size:
            raise ValueError(f"ep_size ({ep_size}) must divide the number of experts of {path} ({len(experts)})")
        fc1 = experts[0].fc1
        new = ExpertParallelMoEMlp(fc1.in_features, fc1.out_features, len(experts), old.router.top_k,
                                   old.router.num_tasks, ep_size, router=old.router)
        if world > 1:
            new.set_deepspeed_parallelism(use_data_before_expert_parallel)
        for local, global_id in zip(new.local_experts, new.global_expert_ids()):
            local.load_state_dict(experts[global_id].state_dict())
        device = next(old.parameters()).device
        new.to(device=device, dtype=fc1.weight.dtype)
        new.name = getattr(old, "name", path)
        _replace(model, path, new)
    return model


def convert_to_single_process(model: nn.Module) -> nn.Module:
    """The reverse of :func:`convert_to_expert_parallel` (in place): every rank gets ``MoEMlp`` layers
    holding all experts, gathered over the expert-parallel group. A collective when ``ep_size > 1``:
    every rank must call it."""
    for path, layer in expert_parallel_layers(model):
        router = layer.router
        fc1 = layer.local_experts[0].fc1
        new = MoEMlp(fc1.in_features, fc1.out_features, layer.num_experts, router.top_k, router.num_tasks)
        new.router = router
        for global_id, state in _gather_expert_states(layer).items():
            new.experts.experts[global_id].load_state_dict(state)
        new.to(device=fc1.weight.device, dtype=fc1.weight.dtype)
        new.name = layer.name
        _replace(model, path, new)
    return model


def _gather_expert_states(layer: ExpertParallelMoEMlp) -> dict[int, dict[str, torch.Tensor]]:
    local = {g: {k: v.detach().clone() for k, v in m.state_dict().items()}
             for g, m in zip(layer.global_expert_ids(), layer.local_experts)}
    if layer.ep_size == 1:
        return local
    group = groups._get_expert_parallel_group(layer.expert_group_name)
    keys = list(next(iter(local.values())).keys())
    flat = torch.cat([local[g][k].reshape(-1) for g in sorted(local) for k in keys])
    parts = [torch.empty_like(flat) for _ in range(layer.ep_size)]
    dist.all_gather(parts, flat.contiguous(), group=group)
    template = next(iter(local.values()))
    out = {}
    for r, part in enumerate(parts):
        offset = 0
        for i in range(layer.num_local_experts):
            state = {}
            for k in keys:
                n = template[k].numel()
                state[k] = part[offset:offset + n].view_as(template[k]).clone()
                offset += n
            out[r * layer.num_local_experts + i] = state
    return out


def moe_param_groups(model: nn.Module, weight_decay: float = 0.0,
                     no_decay: Optional[Iterable[str]] = None) -> list[dict]:
    """Optimizer parameter groups DeepSpeed's MoE support requires (ZeRO 1/2 assert on them): dense and
    expert parameters in separate groups, experts marked ``moe=True`` with their group name.

    Without ``no_decay`` every parameter gets ``weight_decay``; otherwise parameters whose name ends with
    one of ``no_decay`` or that are 1-D (biases, norms) get none."""
    decay, skip = [], []
    suffixes = tuple(no_decay or ())
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if no_decay is not None and (p.ndim <= 1 or name.endswith(suffixes)):
            skip.append(p)
        else:
            decay.append(p)
    param_groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay}]
    if skip:
        param_groups.append({"name": "no_decay", "params": skip, "weight_decay": 0.0})
    return split_params_into_different_moe_groups_for_optimizer(param_groups)


_EP_KEY = re.compile(rf"^(.*)\.{re.escape(_DS_EXPERTS)}\.(\d+)\.(.*)$")


def reference_key(key: str, global_expert_id: Optional[int] = None) -> str:
    """Map a state-dict key of an expert-parallel model to the ``MoEMlp`` model's key.

    Expert keys of DeepSpeed's expert checkpoint files already carry the global expert id; keys from a
    live module's ``state_dict`` carry the local id: pass ``global_expert_id`` for those.
    """
    m = _EP_KEY.match(key)
    if m:
        expert = global_expert_id if global_expert_id is not None else int(m.group(2))
        return f"{m.group(1)}.experts.experts.{expert}.{m.group(3)}"
    return key.replace(f".{_DS_ROUTER}.", ".router.")


def expert_parallel_key(key: str) -> str:
    """Map a ``MoEMlp`` model key to the expert-parallel model's key (expert ids stay global, as in
    DeepSpeed's ``layer_{L}_expert_{E}`` files). Keys of other modules pass through unchanged, so
    apply it only to keys of MoE MLP layers."""
    key = re.sub(r"\.experts\.experts\.(\d+)\.", rf".{_DS_EXPERTS}.\1.", key)
    return key.replace(".router.", f".{_DS_ROUTER}.")


def expert_checkpoint_name(layer_id: int, global_expert_id: int, mp_rank: int = 0) -> str:
    """File name of one expert's weights in a DeepSpeed checkpoint tag folder."""
    return f"layer_{layer_id}_expert_{global_expert_id}_mp_rank_{mp_rank:02d}_model_states.pt"


def is_expert_param(p: torch.Tensor) -> bool:
    return is_moe_param(p)


@torch.no_grad()
def clip_grad_norm_(module: nn.Module, max_norm: float, eps: float = 1e-6) -> torch.Tensor:
    """Global L2 gradient norm of an expert-parallel model, and clip to ``max_norm`` (0: measure only).

    For ZeRO stage 0, where DeepSpeed 0.19.8's own clipping (``runtime.utils.clip_grad_norm_``) averages
    the per-rank norms over the data-parallel group: each rank's norm holds only its own experts, so
    with ``ep_size > 1`` the clip norm misses the other ranks' experts (ZeRO 1/2 sum the partitioned
    norms over all ranks and are right; tests/distributed/test_ep_equivalence.py checks both). Use it with
    ``gradient_clipping: 0`` in the DeepSpeed config, after ``engine.backward`` (grads are reduced
    there) and before ``engine.step``. A collective: every rank must call it.
    """
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    # Squared norms summed on the gradients' device: one host sync for the whole model (the
    # ``float(total)`` below), not one ``.cpu()`` per parameter.
    device = grads[0].device
    dense_sq = torch.zeros((), dtype=torch.float64, device=device)
    expert_sq: dict[str, torch.Tensor] = {}
    for p in module.parameters():
        if p.grad is None:
            continue
        sq = p.grad.detach().double().pow(2).sum().to(device)
        if is_moe_param(p):
            expert_sq[p.group_name] = expert_sq.get(p.group_name, torch.zeros_like(dense_sq)) + sq
        else:
            dense_sq += sq
    total_sq = dense_sq
    for group_name in sorted(expert_sq):
        # after DeepSpeed's reduction an expert's gradient is identical on its expert-data-parallel
        # replicas; the ranks of one expert-parallel group hold different experts: sum over those.
        part = expert_sq[group_name]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(part, group=groups._get_expert_parallel_group(group_name))
        total_sq = total_sq + part
    total = total_sq.sqrt().float()
    if max_norm > 0:
        coef = min(1.0, float(max_norm) / (float(total) + eps))
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
    return total
