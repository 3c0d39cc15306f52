"""How one run is laid out over its ranks, validated before any process group exists.

DeepSpeed checks most of these itself, but only inside ``deepspeed.initialize``, after every rank
has joined the process group, and as an assert or a hang: ``ep_size`` not dividing the world size
fails while building expert groups, ZeRO-3 with native MoE asserts. :class:`ParallelDims` refuses them
from the world size alone (known from the launcher's environment), with the key the user sets.

Layout (DeepSpeed's, see deepspeed/utils/groups.py): dense parameters are replicated on all
``world_size`` ranks; each MoE MLP layer's experts are split over ``ep_size`` consecutive ranks (an
expert-parallel group, each rank holding ``num_experts // ep_size`` experts) and every expert is
replicated ``world_size // ep_size`` times (its expert-data-parallel group, strided ranks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from modsquad_ds.config.schema import ConfigError

if TYPE_CHECKING:
    from modsquad_ds.config.schema import RunConfig

ZERO3_REFUSAL = "Native DeepSpeed MoE is not supported with ZeRO Stage 3"
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    ep_size: int = 1
    num_experts: int = 1
    """Experts per MoE MLP layer (moe.mlp.num_experts); 1 and ep_size 1 when there is no MoE MLP."""
    micro_batch: int = 1
    grad_accum: int = 1
    zero_stage: int = 0
    precision: str = "fp32"

    def __post_init__(self):
        if self.world_size < 1:
            raise ConfigError("WORLD_SIZE", f"must be >= 1, got {self.world_size}")
        if self.ep_size < 1:
            raise ConfigError("train.ep_size", f"must be >= 1, got {self.ep_size}")
        if self.world_size % self.ep_size:
            raise ConfigError("train.ep_size", f"({self.ep_size}) must divide the world size "
                              f"({self.world_size} ranks): --set train.ep_size=N for this launch (another "
                              "run's config.yaml carries that run's)")
        if self.num_experts < 1:
            raise ConfigError("moe.mlp.num_experts", f"must be >= 1, got {self.num_experts}")
        if self.num_experts % self.ep_size:
            raise ConfigError("train.ep_size", f"({self.ep_size}) must divide moe.mlp.num_experts "
                              f"({self.num_experts})")
        if self.micro_batch < 1:
            raise ConfigError("data.batch_size", f"must be >= 1, got {self.micro_batch}")
        if self.grad_accum < 1:
            raise ConfigError("train.grad_accum", f"must be >= 1, got {self.grad_accum}")
        if self.zero_stage == 3:
            raise ConfigError("train.zero_stage", f"3 is refused: {ZERO3_REFUSAL}; use 0, 1 or 2")
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError("train.zero_stage", f"must be 0, 1 or 2, got {self.zero_stage}")
        if self.precision not in PRECISIONS:
            raise ConfigError("train.precision", f"must be fp32 or bf16, got {self.precision!r}")

    @property
    def dp_size(self) -> int:
        """Replicas of every dense parameter: all ranks (ZeRO shards these, ep does not)."""
        return self.world_size

    @property
    def expert_dp_size(self) -> int:
        """Replicas of every expert: DeepSpeed averages expert gradients over this many ranks."""
        return self.world_size // self.ep_size

    @property
    def local_experts(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def global_batch(self) -> int:
        """Images per optimizer step over the whole job."""
        return self.micro_batch * self.grad_accum * self.world_size

    def describe(self) -> str:
        return (f"world={self.world_size} dp={self.dp_size} ep={self.ep_size} "
                f"expert_dp={self.expert_dp_size} experts/rank={self.local_experts}/{self.num_experts} "
                f"micro_batch={self.micro_batch} grad_accum={self.grad_accum} "
                f"global_batch={self.global_batch} zero={self.zero_stage} {self.precision}")

    @classmethod
    def from_config(cls, cfg: "RunConfig", world_size: int, ds_config: Optional[dict] = None) -> "ParallelDims":
        """Dims of a run; ``ds_config`` (from :func:`modsquad_ds.distributed.ds_config.ds_config_for_run`)
        supplies the resolved ZeRO stage, precision and accumulation when given."""
        mlp = cfg.moe.mlp
        if not mlp.enabled and cfg.train.ep_size != 1:
            raise ConfigError("train.ep_size", f"({cfg.train.ep_size}) must be 1 when moe.mlp.enabled "
                              "is false: there are no MLP experts to shard")
        if ds_config is not None:
            zero = ds_config.get("zero_optimization", {}).get("stage", 0)
            precision = "bf16" if ds_config.get("bf16", {}).get("enabled", False) else "fp32"
            accum = ds_config.get("gradient_accumulation_steps", 1)
            micro = ds_config.get("train_micro_batch_size_per_gpu", cfg.data.batch_size)
        else:
            zero = cfg.train.zero_stage or 0
            precision = cfg.train.precision or "fp32"
            accum = cfg.train.grad_accum or 1
            micro = cfg.data.batch_size
        return cls(world_size=world_size, ep_size=cfg.train.ep_size,
                   num_experts=mlp.num_experts if mlp.enabled else 1, micro_batch=micro,
                   grad_accum=accum, zero_stage=zero, precision=precision)
