"""All-to-all traffic of expert parallelism per training step, and its time on a given link.

DeepSpeed's ``MOELayer`` (deepspeed/moe/sharded_moe.py) packs each MoE MLP call's tokens into an
``(E, C, D)`` buffer and exchanges it with ``_AllToAll`` (``torch.distributed.all_to_all_single``)
twice in forward (dispatch, combine) and twice in backward (their gradients), every tensor of the
same shape. ``C`` is the busiest expert's token count on any rank of the expert-parallel group
(dropless; moe/ds_adapter/gate.py), so a rank's buffer is ``E x C`` rows of ``D`` activations for its
``k x tokens`` routed copies: ``capacity_factor = E C / (k tokens)`` is 1.0 for perfectly even
routing. Of each buffer, a rank keeps 1/ep_size and sends the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from modsquad_ds.plan.memory import DTYPE_BYTES, shapes

ALLTOALLS_PER_CALL = 4
"""dispatch and combine in forward, and their gradients in backward."""


@dataclass(frozen=True)
class AllToAll:
    bytes_per_step: int
    """Bytes handed to all_to_all_single by one rank in one optimizer step (all micro steps)."""
    sent_per_step: int
    """The part that leaves the rank: (ep_size - 1) / ep_size of it."""
    calls_per_step: int


def moe_mlp_layers(cfg) -> int:
    return sum(mlp for _, mlp in shapes(cfg).kinds)


def capacity(cfg, micro_batch: int, capacity_factor: float) -> int:
    s = shapes(cfg)
    tokens = micro_batch * s.tasks * s.tokens
    return math.ceil(capacity_factor * s.mlp_k * tokens / s.mlp_e)


def alltoall(cfg, *, micro_batch: int, accumulation: int, ep_size: int, dtype: str,
             capacity_factor: float = 1.0, capacities: Optional[Sequence[int]] = None) -> AllToAll:
    """All-to-all volume of one rank. ``capacities``: the C of every MoE MLP call of one step, in
    call order, when known (a measured run); otherwise every call gets :func:`capacity`."""
    if ep_size == 1:
        return AllToAll(0, 0, 0)
    s = shapes(cfg)
    calls = moe_mlp_layers(cfg) * accumulation
    if capacities is None:
        capacities = [capacity(cfg, micro_batch, capacity_factor)] * calls
    elif len(capacities) != calls:
        raise ValueError(f"{len(capacities)} capacities given for {calls} MoE MLP calls per step")
    total = sum(ALLTOALLS_PER_CALL * s.mlp_e * c * s.dim * DTYPE_BYTES[dtype] for c in capacities)
    return AllToAll(total, total * (ep_size - 1) // ep_size, ALLTOALLS_PER_CALL * calls)


def seconds(sent_bytes: int, link_gbps: float) -> float:
    """Transfer time at ``link_gbps`` gigabits per second per GPU, ignoring latency and overlap."""
    return sent_bytes * 8 / (link_gbps * 1e9)
