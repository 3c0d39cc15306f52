"""Bytes per GPU of a Mod-Squad training run: model state by ZeRO stage and ep_size, activations.

Model state follows DeepSpeed 0.19.8's ZeRO 1/2 optimizer (deepspeed/runtime/zero/stage_1_and_2.py)
with native MoE. ``moe_param_groups`` puts expert weights in their own optimizer groups, and ZeRO
partitions every group over that group's data-parallel process group
(``real_dp_process_group[i]``): the whole world for dense weights, the expert-data-parallel group
(world / ep_size ranks holding the same experts; deepspeed/utils/groups.py) for expert weights.
So a GPU holds

- the module's weights in the training dtype: all dense weights, its ep-th share of the experts
  (``bit16_groups_flat``, one flat buffer per group);
- an fp32 master partition (``single_partition_of_fp32_groups``: a clone even when training in
  fp32) of 1/world of the dense and 1/(world/ep) of its experts, and Adam's two fp32 moments of it;
- gradients: ZeRO 0/1 keep every local weight's gradient until the step (``param.grad``, training
  dtype), ZeRO 2 only its partition (``grads_in_partition``); the step flattens the partition's
  gradients into one fp32 tensor; and one reduce bucket per parameter dtype (``setup_buckets``:
  ``reduce_bucket_size`` elements).

Only MoE MLP experts are sharded: attention experts stay replicated (a token's heads attend over
every token of its image, so they cannot be split by token dispatch; see moe/ds_adapter/).

Activations: :func:`activation_bytes_per_image` adds up the tensors autograd saves for backward,
layer by layer, read off the code of model/vit.py, model/blocks.py, moe/attention.py,
moe/router.py and DeepSpeed's MOELayer (moe/sharded_moe.py); tests/unit/plan checks it against the
bytes the saved-tensor hooks see, and the whole prediction against a profiled step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

REDUCE_BUCKET_ELEMENTS = 50_000_000
"""``reduce_bucket_size`` of every shipped ZeRO 1/2 config (ds_configs/zero[12]_*.json)."""

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class ParamCounts:
    dense: int
    """Every weight not sharded by expert parallelism (attention experts and routers included)."""
    mlp_experts: int
    """All MoE MLP experts of all layers; sharded over ep_size ranks."""
    frozen_dense: int = 0
    """Of ``dense``, the weights a fine-tuning mode freezes (finetune.mode routers or heads)."""
    frozen_experts: int = 0
    """Of ``mlp_experts``, the frozen ones (all of them in modes routers and heads)."""

    @property
    def total(self) -> int:
        return self.dense + self.mlp_experts

    @property
    def trainable(self) -> int:
        return self.total - self.frozen_dense - self.frozen_experts


def count_params(cfg) -> ParamCounts:
    """Parameters of the training module (model and task weighting), counted on a real build, and
    those ``cfg.finetune.mode`` freezes (modsquad_ds.finetune.trainable selects them by name).

    The build is in bf16 (half the memory and time of fp32: ViT-B takes about 2 s); the meta device
    cannot build the model (its drop-path schedule reads a tensor's values).
    """
    from modsquad_ds.finetune.trainable import trainable_names
    from modsquad_ds.model.factory import build_model
    from modsquad_ds.model.objective import MultiTaskObjective

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        module = torch.nn.Module()  # named as the trainer's TrainModule: model.*, objective.*
        module.model = build_model(_without_pretrained(cfg))
        module.objective = MultiTaskObjective(cfg)
    finally:
        torch.set_default_dtype(default)
    trains = trainable_names(module, cfg.finetune.mode)
    n = {"dense": 0, "mlp_experts": 0, "frozen_dense": 0, "frozen_experts": 0}
    for name, p in module.named_parameters():
        kind = "mlp_experts" if ".experts.experts." in name else "dense"  # MoEMlp's MLPExperts: what ep shards
        n[kind] += p.numel()
        if name not in trains:
            n["frozen_" + kind.removeprefix("mlp_")] += p.numel()
    return ParamCounts(**n)


def _without_pretrained(cfg):
    from dataclasses import replace

    return replace(cfg, model=replace(cfg.model, pretrained=None)) if cfg.model.pretrained else cfg


@dataclass(frozen=True)
class StateBytes:
    weights: int
    master: int
    adam: int
    grads: int
    """Gradients held at the end of backward (ZeRO 0/1: full local, ZeRO 2: partition)."""
    step_grads: int
    """fp32 flat gradient partition the optimizer step builds (ZeRO 1/2)."""
    buckets: int
    """Reduce bucket, allocated when backward starts and freed after the step."""

    @property
    def held(self) -> int:
        """Held for the whole run: weights, master partition, Adam moments."""
        return self.weights + self.master + self.adam


def state_bytes(params: ParamCounts, *, world: int, ep_size: int, zero: int, dtype: str) -> StateBytes:
    """Model and optimizer state on one GPU (see the module docstring for where each term lives).
    Frozen weights (fine-tuning) are held in the training dtype and nothing else: no gradient, no
    optimizer state (``moe_param_groups`` leaves them out of the optimizer)."""
    w = DTYPE_BYTES[dtype]
    local = params.dense + params.mlp_experts // ep_size
    train_dense = params.dense - params.frozen_dense
    train_experts = (params.mlp_experts - params.frozen_experts) // ep_size
    if zero == 0:
        part = train_dense + train_experts  # no partitioning: AdamW holds fp32 moments of every local weight
        # bf16 without ZeRO (routers/heads fine-tuning) runs DeepSpeed's FP16_UnfusedOptimizer: an
        # fp32 copy of every trained weight, and fp32 copies of their gradients during the step
        master = 4 * part if dtype != "fp32" else 0
        return StateBytes(weights=w * local, master=master, adam=8 * part, grads=w * part, step_grads=master,
                          buckets=0)
    edp = world // ep_size
    part = _ceil_div(train_dense, world) + _ceil_div(train_experts, edp)
    grads = w * (train_dense + train_experts) if zero == 1 else w * part
    # One bucket per parameter dtype (experts and dense weights share it), of the gradient
    # reduction dtype: the training dtype, as grad_accum_dtype is unset (_gradient_reduction_buffer_dtype).
    buckets = REDUCE_BUCKET_ELEMENTS * w
    return StateBytes(weights=w * local, master=4 * part, adam=8 * part, grads=grads, step_grads=4 * part,
                      buckets=buckets)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ------------------------------------------------------------------------------------ activations

@dataclass(frozen=True)
class Shapes:
    tasks: int
    tokens: int  # per image, class token included
    dim: int
    mlp_hidden: int
    heads: int
    kinds: list  # (moe_attn, moe_mlp) per block
    attn_k: int
    attn_e: int
    attn_h: int
    mlp_k: int
    mlp_e: int
    mlp_expert_hidden: int  # one MLP expert's hidden width (moe.mlp.expert_dim, default hidden / top-k)
    img: int
    first_block: int
    head_out: int  # sum over tasks of the head's outputs per image (pixels x channels or classes)
    pixel_tasks: int  # tasks with a pixel head (a linear layer on every patch token)


def shapes(cfg) -> Shapes:
    from modsquad_ds.data.tasks import get_task
    from modsquad_ds.model.vit import block_kinds

    m, moe = cfg.model, cfg.moe
    grid = m.img_size // m.patch_size
    head_out = pixel_tasks = 0
    for name in cfg.tasks.names:
        spec = get_task(name)
        head_out += spec.channels * (m.img_size ** 2 if spec.kind == "pixel" else 1)
        pixel_tasks += spec.kind == "pixel"
    return Shapes(tasks=len(cfg.tasks.names), tokens=grid * grid + 1, dim=m.embed_dim, mlp_hidden=m.mlp_hidden,
                  heads=m.num_heads, kinds=block_kinds(m.depth, moe), attn_k=moe.attn.top_k,
                  attn_e=moe.attn.num_experts, attn_h=moe.attn.resolved_dim(m.embed_dim), mlp_k=moe.mlp.top_k,
                  mlp_e=moe.mlp.num_experts, mlp_expert_hidden=moe.mlp.resolved_dim(m.mlp_hidden), img=m.img_size,
                  first_block=moe.first_block, head_out=head_out, pixel_tasks=pixel_tasks)


def activation_bytes_per_image(cfg, dtype: str = "fp32", capacity_factor: float = 1.0, ep_size: int = 1,
                               device: str = "cuda") -> float:
    """Bytes autograd saves for backward per image of a micro batch (all tasks of the image).

    ``capacity_factor``: at ep_size > 1, DeepSpeed's expert buffer holds E x C rows with C the
    busiest expert's token count; 1.0 is perfectly balanced routing (C = k S / E). At ep_size 1 the
    MoE MLP layers run the dropless local dispatch (moe/layer.dropless_moe): exactly k S rows, and
    on ``device`` "cpu" dispatch, experts and combine expert by expert (moe/cpu_mlp.py), which keeps
    the GELU's input but not its output, the gathered token copies nor the expert outputs.

    With ``model.grad_checkpointing`` every block keeps only its input through the forward, and
    backward recomputes one block at a time: the inputs of all blocks plus the largest block's own.

    Fine-tuning (``cfg.finetune.mode``) saves less. In mode routers the backbone's weights are
    frozen: what a layer keeps only for its weight's gradient goes (a linear layer's input, the
    image), what the gradient on its way to the routers and the task embedding needs stays
    (LayerNorm statistics, SDPA's inputs, the GELU's input, the expert outputs the gates multiply),
    and the blocks before the first MoE layer, which the task embedding has not reached, save
    nothing. In mode heads nothing before the heads trains and the backbone saves nothing; then
    the most the step holds is the forward's working set in its largest layer, which this adds
    (:func:`_forward_working_set`).
    """
    s = shapes(cfg)
    a = DTYPE_BYTES[dtype]
    f = 4
    d, n, rows = s.dim, s.tokens, s.tasks * s.tokens  # rows: task slots x tokens, after the shared prefix
    heads = rows * d * a                        # the heads' input (the final norm's output)
    heads += s.pixel_tasks * (n - 1) * d * a    # a pixel head's patch tokens, copied out of it
    heads += s.head_out * a * 2                 # head outputs, kept by the losses with their targets
    if cfg.finetune.mode == "heads":
        return heads + _forward_working_set(cfg, s, a, capacity_factor, ep_size, device)
    wg = cfg.finetune.mode != "routers"  # the backbone's weights train: layers keep their inputs for them
    # the task-independent prefix saves nothing when nothing in it or before it trains
    first = 0 if wg else s.first_block
    blocks = [_block_bytes(cfg, s, a, b, wg, capacity_factor, ep_size, device) for b in range(first, len(s.kinds))]
    outside = 3 * s.img ** 2 * a * wg           # the image, saved by the patch-embedding convolution
    outside += rows * (d * a + 2 * f) + heads   # final norm: input, stats; the heads
    if cfg.model.grad_checkpointing:  # each block keeps its input; backward recomputes one block at a time
        inputs = sum(_rows(s, b) * d * a for b in range(first, len(s.kinds)))
        return outside + inputs + max(blocks, default=0)
    return outside + sum(blocks)


def _rows(s: Shapes, b: int) -> int:
    """Token rows of one image in block ``b``: the shared prefix runs once, later blocks per task slot."""
    return s.tokens if b < s.first_block else s.tasks * s.tokens


def _forward_working_set(cfg, s: Shapes, a: int, capacity_factor: float, ep_size: int, device: str) -> float:
    """Bytes one image's forward holds at once in its largest layer when nothing is saved: the
    block's input, the normed tokens and the layer's output, and the layer's own intermediates
    while it runs (MoA: queries, shared keys/values, attention and expert outputs, the dispatched
    token copies being freed once projected; MoE MLP: each slot's hidden and output rows)."""
    d = s.dim
    most = 0.0
    for b, (moe_attn, moe_mlp) in enumerate(s.kinds):
        r = _rows(s, b)
        if moe_attn:
            k, h = s.attn_k, s.attn_h
            attn = r * k * (d + 2 * h) + r * 2 * h
        else:
            attn = r * 5 * d  # q, k, v, SDPA output, projection
        if moe_mlp:
            k = s.mlp_k
            h = s.mlp_expert_hidden
            buf = r * k * (1.0 if ep_size == 1 else capacity_factor)
            # moe/cpu_mlp.py: fc1 outputs and expert outputs; else also the token copies and the GELU's output
            mlp = buf * (h + d) * (1 if ep_size == 1 and device == "cpu" else 2)
        else:
            mlp = r * 2 * s.mlp_hidden
        most = max(most, (3 * r * d + max(attn, mlp)) * a)
    return most


def _block_bytes(cfg, s: Shapes, a: int, b: int, wg: bool, capacity_factor: float, ep_size: int,
                 device: str) -> float:
    """What block ``b`` saves per image; ``wg``: its weights train (else only what flows back to
    routers and task embedding stays)."""
    f, i64 = 4, 8
    moe_attn, moe_mlp = s.kinds[b]
    d = s.dim
    r = _rows(s, b)
    noisy = cfg.moe.router_noise
    router_keeps_input = a == f  # the gate's matmul saves its input itself in fp32, an fp32 copy otherwise
    # LayerNorm 1 and 2: input (a), mean and rstd (fp32); the normed outputs are saved by the next linear
    block = r * 2 * (d * a + 2 * f)
    if moe_attn:
        k, h = s.attn_k, s.attn_h
        block += _router(r, d, s.attn_e, k, a, noisy)
        block += r * (d * a) * (wg or router_keeps_input)  # LayerNorm 1 output (router, k/v input)
        block += r * k * d * a * wg             # dispatched token copies (query projections' input)
        block += r * k * h * a * 2              # unpermuted queries and attention output (SDPA)
        block += r * 2 * h * a                  # shared keys/values (SDPA)
        block += r * k * f                      # SDPA's logsumexp
        block += r * k * h * a * wg             # expert-sorted attention output (output projections' input)
        block += r * k * d * a                  # expert outputs in expert order (the combine's input)
        block += r * k * (f + 3 * i64)          # gates (fp32); slot tokens, slot order and its inverse
    else:
        block += r * d * a * wg                 # LayerNorm 1 output (qkv input)
        block += r * 3 * d * a                  # q, k, v (SDPA)
        block += r * d * a * (1 + wg)           # SDPA output and the projection's input
        block += r * s.heads * f                # SDPA's logsumexp
    if moe_mlp:
        k = s.mlp_k
        h = s.mlp_expert_hidden
        local = ep_size == 1                    # dropless dispatch, else DeepSpeed's (E, C, D) buffer
        buf = r * k * (1.0 if local else capacity_factor)
        block += _router(r, d, s.mlp_e, k, a, noisy)
        block += r * d * a * (wg or router_keeps_input)  # LayerNorm 2 output (experts' input)
        block += buf * h * a                    # GELU input
        if not (local and device == "cpu"):     # moe/cpu_mlp.py recomputes the GELU and the gates' gradient
            block += buf * (d + h) * a * wg     # fc1 input and GELU output, for the experts' weights
            block += r * k * d * a              # expert outputs (saved by the combine / gate multiply)
        # gates; slot tokens and the inverse order (local), or the slots of _sparse_decode
        block += r * k * (f + (2 if local else 1) * i64)
    else:
        block += r * d * a * wg                 # LayerNorm 2 output (fc1 input)
        block += r * s.mlp_hidden * a * (1 + wg)  # GELU input and output (fc2 input)
    return block


def expert_weight_copies(cfg, dtype: str = "fp32", ep_size: int = 1, device: str = "cuda") -> float:
    """Bytes saved once per step, whatever the batch: the local experts' weights stacked into
    ``(E_local, h, D)`` tensors for fc1 and fc2 of every MoE MLP layer, which the expert matmuls keep
    for backward (moe/experts.py at ep_size 1, either kernel; moe/ds_adapter/layer.BatchedExperts
    at ep_size > 1). None at ep_size 1 on a CPU: moe/cpu_mlp.py uses each expert's own weights.
    MoA's projections are stored stacked: nothing is copied for them. With ``model.grad_checkpointing``
    only the block being recomputed holds its copies."""
    if (ep_size == 1 and device == "cpu") or cfg.finetune.mode == "heads":  # heads: no gradient reaches them
        return 0.0
    s = shapes(cfg)
    h = s.mlp_expert_hidden
    layers = 1 if cfg.model.grad_checkpointing else sum(1 for _attn, mlp in s.kinds if mlp)
    return layers * 2 * (s.mlp_e // ep_size) * s.dim * h * DTYPE_BYTES[dtype]


def activation_bytes(cfg, micro_batch: int, dtype: str = "fp32", capacity_factor: float = 1.0,
                     ep_size: int = 1, device: str = "cuda") -> float:
    """Bytes autograd saves for backward in one micro step of ``micro_batch`` images on ``device``
    ("cuda" or "cpu", see :func:`activation_bytes_per_image`)."""
    return (micro_batch * activation_bytes_per_image(cfg, dtype, capacity_factor, ep_size, device)
            + expert_weight_copies(cfg, dtype, ep_size, device))


def _router(rows: int, dim: int, experts: int, k: int, a: int, noisy: bool) -> float:
    """TaskRouter (fp32 gate math): probabilities saved by softmax and top-k's indices; the noisy
    branch also keeps softplus's input, the noise draw and the noise scale."""
    f = 4
    out = rows * experts * f + rows * k * 8
    if noisy:
        out += rows * experts * f * 3
    if a != f:
        out += rows * dim * f  # the fp32 copy of the input saved by the gate bmm
    return out


def peak_bytes(state: StateBytes, activations: float) -> float:
    """Peak of one training step on one GPU.

    Weights, master partition and Adam moments are held throughout; DeepSpeed allocates its reduce
    bucket when backward starts (``setup_buckets``) and frees it after the step. Backward frees
    activations as it creates gradients, so the step peaks either when backward starts (every
    activation saved) or at the optimizer step (gradients and their flat fp32 partition).
    """
    return state.held + state.buckets + max(activations, state.grads + state.step_grads)
