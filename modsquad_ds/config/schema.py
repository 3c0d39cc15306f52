"""The run configuration: nested dataclasses, validated on construction.

Every field is a knob a user may set from YAML or with ``--set section.key=value``; the docstring
beside each says what it does. Cross-field checks live in ``__post_init__`` and raise
:class:`ConfigError` with the key spelled as the user writes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from modsquad_ds.config.data import DataConfig
from modsquad_ds.config.finetune import FinetuneConfig
from modsquad_ds.config.train import TrainConfig

COMPILE_NEEDS_TORCH = (2, 10)
"""The oldest torch whose ``torch.compile`` compiles the model's blocks (tested from 2.4 up)."""


def installed_torch() -> tuple[int, int]:
    """(major, minor) of the installed torch, read from its metadata (no import)."""
    from importlib.metadata import version

    major, minor = version("torch").split(".")[:2]
    return int(major), int(minor)


class ConfigError(ValueError):  # noqa: N818 - reads better at call sites than ConfigurationError
    """A bad configuration value; ``key`` is the dotted path as the user writes it."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)

    def under(self, prefix: str) -> "ConfigError":
        """The same error with its key placed under a parent section."""
        return ConfigError(f"{prefix}.{self.key}" if self.key else prefix, self.message)


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(key, message)


@dataclass
class ModelConfig:
    """The ViT backbone. Defaults are the ``tiny`` preset."""

    img_size: int = 32
    patch_size: int = 8
    in_chans: int = 3
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.0
    pretrained: Optional[str] = None
    """Local path of a dense timm ViT checkpoint (.pth/.pt/.bin/.safetensors) that initialises the
    dense parts: patch embedding, position embedding, norms, dense attention and dense MLPs."""
    class_head: Literal["cls_token", "mean_patch"] = "cls_token"
    """Fidelity switch. cls_token: a linear layer on the class token (paper, Fig. 2); mean_patch: the
    authors' code, the mean of the patch tokens, a LayerNorm, then the linear layer."""
    grad_checkpointing: bool = False
    """Recompute each block's activations in backward instead of keeping them (timm's
    ``set_grad_checkpointing``). Every block holds all task slots, so activations grow with the
    number of tasks; this trades about one extra forward for most of that memory
    (docs/benchmarks.md). Losses and gradients are unchanged."""
    compile: bool = False
    """Training: ``torch.compile`` every transformer block in place (torchtitan compiles per block),
    so parameter names, DeepSpeed's view and the checkpoints are unchanged. The first step compiles
    (tens of seconds); the gain is fewer kernel launches on GPUs, where the step is launch-bound at
    the small preset (issue 7; ``benchmarks/train_step.py --compile`` measures it). Needs
    train.ep_size 1 (DeepSpeed's all-to-all is not traced) and torch >= 2.10 (older compilers fail on
    the MoE blocks). Random draws differ from eager mode's."""

    def __post_init__(self):
        _require(self.class_head in ("cls_token", "mean_patch"), "class_head",
                 f"must be 'cls_token' or 'mean_patch', got {self.class_head!r}")
        for key in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
            _require(getattr(self, key) > 0, key, f"must be positive, got {getattr(self, key)}")
        _require(self.img_size % self.patch_size == 0, "img_size",
                 f"({self.img_size}) must be a multiple of model.patch_size ({self.patch_size})")
        _require(self.embed_dim % self.num_heads == 0, "embed_dim",
                 f"({self.embed_dim}) must be a multiple of model.num_heads ({self.num_heads})")
        _require(self.mlp_ratio > 0, "mlp_ratio", f"must be positive, got {self.mlp_ratio}")
        _require(0.0 <= self.drop_path_rate < 1.0, "drop_path_rate", "must be in [0, 1)")

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


@dataclass
class ExpertsConfig:
    """One kind of MoE layer (attention heads or MLPs)."""

    enabled: bool = True
    num_experts: int = 8
    top_k: int = 2
    expert_dim: Optional[int] = None
    """Hidden size of one expert. None: the dense hidden size divided by top_k, so that the active
    FLOPs match the dense layer (paper, Sec. 4.1); for attention experts that is the head size."""

    def __post_init__(self):
        _require(self.num_experts >= 1, "num_experts", f"must be >= 1, got {self.num_experts}")
        _require(1 <= self.top_k, "top_k", f"must be >= 1, got {self.top_k}")
        _require(self.top_k <= self.num_experts, "top_k",
                 f"({self.top_k}) must be <= num_experts ({self.num_experts})")
        _require(self.expert_dim is None or self.expert_dim > 0, "expert_dim",
                 f"must be positive or null, got {self.expert_dim}")

    def resolved_dim(self, dense_hidden: int) -> int:
        return self.expert_dim if self.expert_dim is not None else max(1, dense_hidden // self.top_k)


@dataclass
class MoEConfig:
    """Where the mixture-of-experts layers go and how tokens are routed."""

    placement: Literal["alternate", "every"] = "alternate"
    """alternate: even blocks MoE attention + dense MLP, odd blocks dense attention + MoE MLP (the
    reference code); every: both MoE kinds in every block (the paper's appendix A4/A5)."""
    first_block: int = 0
    """Blocks before this one are dense and task independent: they run once per image."""
    attn: ExpertsConfig = field(default_factory=lambda: ExpertsConfig(num_experts=8, top_k=4))
    mlp: ExpertsConfig = field(default_factory=lambda: ExpertsConfig(num_experts=8, top_k=2))
    router_noise: bool = True
    """Noisy top-k gating (paper eq. 2); the noise is applied in training only."""
    noise_epsilon: float = 1e-2
    """Added to softplus(x W_noise) so the noise never collapses to zero (reference code)."""
    eval_noise: bool = False
    """Fidelity switch: keep the router noise on in evaluation too, as the authors' code does (its
    gates never check the training flag). Off by default: evaluation is then deterministic."""
    wide_dense_attention: bool = False
    """Fidelity switch: the dense attention of blocks that hold an MoE MLP (the alternating layout's
    odd blocks) uses heads of width 2 * embed_dim / num_heads, as the authors' code does; false: the
    standard width embed_dim / num_heads. Adds parameters and FLOPs (python -m modsquad_ds.info)."""

    def __post_init__(self):
        _require(self.placement in ("alternate", "every"), "placement",
                 f"must be 'alternate' or 'every', got {self.placement!r}")
        _require(self.first_block >= 0, "first_block", f"must be >= 0, got {self.first_block}")
        _require(self.noise_epsilon >= 0, "noise_epsilon", "must be >= 0")


@dataclass
class LossConfig:
    """How the per-task losses and the auxiliary routing loss are combined (paper eq. 7)."""

    aux: Literal["mi", "balance", "none"] = "mi"
    """mi: Mod-Squad's mutual-information loss; balance: the standard load-balancing loss of the
    paper's modified-MoE baseline, over all tasks together; none: no auxiliary loss."""
    w_mi: float = 0.001
    """Weight of -I(T;E) summed over MoE layers (paper: 0.001; the reference code uses 0.005)."""
    w_balance: float = 0.01
    task_weighting: Literal["uncertainty", "fixed"] = "uncertainty"
    """uncertainty: learned 0.5/sigma^2 L + log(1 + sigma^2) per task (Kendall et al.); fixed:
    the constant weights of loss.task_weights (default 1)."""
    task_weights: dict[str, float] = field(default_factory=dict)
    mi_table: Literal["probs", "topk_gates"] = "probs"
    """Fidelity switch. probs: the MI table sums the full softmax P(e|x) over tokens (our reading of
    paper eq. 5 and the authors' code); topk_gates: it sums only the top-k gate values (the paper's
    G(x), zero outside the top-k)."""

    def __post_init__(self):
        _require(self.mi_table in ("probs", "topk_gates"), "mi_table",
                 f"must be 'probs' or 'topk_gates', got {self.mi_table!r}")
        _require(self.aux in ("mi", "balance", "none"), "aux",
                 f"must be one of mi, balance, none, got {self.aux!r}")
        _require(self.task_weighting in ("uncertainty", "fixed"), "task_weighting",
                 f"must be 'uncertainty' or 'fixed', got {self.task_weighting!r}")
        _require(self.w_mi >= 0, "w_mi", f"must be >= 0, got {self.w_mi}")
        _require(self.w_balance >= 0, "w_balance", f"must be >= 0, got {self.w_balance}")
        for name, weight in self.task_weights.items():
            _require(weight >= 0, f"task_weights.{name}", f"must be >= 0, got {weight}")


PAPER_TASKS = [
    "class_object", "class_scene", "depth_euclidean", "depth_zbuffer", "normal",
    "principal_curvature", "reshading", "edge_texture", "edge_occlusion", "keypoints2d",
    "keypoints3d", "segment_unsup2d", "segment_unsup25d",
]


@dataclass
class TasksConfig:
    """Which tasks the model learns, by registry name (modsquad_ds.data.tasks)."""

    names: list[str] = field(default_factory=lambda: list(PAPER_TASKS))

    def __post_init__(self):
        from modsquad_ds.data.tasks import TASKS

        _require(len(self.names) > 0, "names", "must list at least one task")
        _require(len(set(self.names)) == len(self.names), "names", "lists a task twice")
        for i, name in enumerate(self.names):
            _require(name in TASKS, f"names[{i}]",
                     f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")


@dataclass
class RunConfig:
    """Everything one run needs; sections are filled in by the later subsystems."""

    preset: str = "tiny"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def __post_init__(self):
        _require(not (self.model.compile and self.train.ep_size > 1), "model.compile",
                 f"needs train.ep_size 1, got {self.train.ep_size} (DeepSpeed's all-to-all is not traced)")
        if self.model.compile:
            have = installed_torch()
            _require(have >= COMPILE_NEEDS_TORCH, "model.compile",
                     f"needs torch >= {'.'.join(map(str, COMPILE_NEEDS_TORCH))}, this is {'.'.join(map(str, have))} "
                     "(its torch.compile fails on the MoE blocks: 2.4-2.5 overwrite the kernel probe, 2.7-2.9 stop "
                     "at the data-dependent expert loop)")
        _require(self.moe.first_block <= self.model.depth, "moe.first_block",
                 f"({self.moe.first_block}) must be <= model.depth ({self.model.depth})")
        for name in self.loss.task_weights:
            _require(name in self.tasks.names, f"loss.task_weights.{name}",
                     f"is not one of tasks.names ({', '.join(self.tasks.names)})")
        for name in self.finetune.init_tasks:
            _require(name in self.tasks.names, f"finetune.init_tasks.{name}",
                     f"is not one of tasks.names ({', '.join(self.tasks.names)}), the tasks to learn")
