"""The ``train`` section of the run configuration (owned by modsquad_ds.train / modsquad_ds.distributed).

DeepSpeed settings live in a JSON under ds_configs/ (``ds_config``); the fields below marked
"overrides" replace the JSON's value when set and leave it alone when null, so one JSON serves every
run and the resolved DeepSpeed config is written into the run folder. Nothing here depends on the
world size: the global batch is data.batch_size x grad_accum x world size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


@dataclass
class TrainConfig:
    """Optimisation, parallel layout and run control."""

    lr: float = 2e-4
    """Base learning rate (paper: 2e-4 with AdamW, weight decay 0.05, cosine decay)."""
    weight_decay: float = 0.05
    min_lr: float = 0.0
    """Cosine decay ends here."""
    steps: int = 100
    """Optimizer steps (each one grad_accum micro steps)."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to lr over this many optimizer steps."""

    ds_config: str = "ds_configs/zero0_fp32.json"
    """DeepSpeed JSON; a relative path is looked up from the working directory, then the repository."""
    zero_stage: Optional[int] = None
    """Overrides zero_optimization.stage: 0, 1 or 2 (3 is refused with native MoE)."""
    precision: Optional[Literal["fp32", "bf16"]] = None
    """Overrides the JSON's bf16 section: fp32 or bf16."""
    grad_accum: Optional[int] = None
    """Overrides gradient_accumulation_steps: micro steps per optimizer step."""
    grad_clip: Optional[float] = None
    """Overrides gradient_clipping: global gradient-norm limit, 0 for none."""
    ep_size: int = 1
    """Expert-parallel degree of the MoE MLP layers: must divide the world size and
    moe.mlp.num_experts; 1 keeps every expert on every rank."""

    out_dir: str = "runs/default"
    """Run folder: resolved config, checkpoints, logs."""
    checkpoint_every: int = 0
    """Save every N optimizer steps; 0: only at the end."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept; older ones are deleted after a save succeeds."""
    resume: bool = True
    """Continue from the newest complete checkpoint in out_dir if there is one."""
    log_every: int = 10
    stop_after: Optional[int] = None
    """End this invocation (with a checkpoint) after this many optimizer steps; the next invocation
    resumes. For queues with time limits; null: run to train.steps."""

    dist_timeout_s: float = 600.0
    """Process-group timeout: a collective that waits longer (a hung peer) raises on every rank."""
    heartbeat_timeout_s: float = 60.0
    """A rank silent this long (killed, node lost) ends the job; 0 disables the heartbeat."""
    nonfinite_patience: int = 3
    """Consecutive optimizer steps with a non-finite loss on any rank before the job stops."""
    eval_every: int = 0
    """Validate every N optimizer steps on a fixed subset (the first train.eval_samples samples of
    data.val_split), logging the paper's metrics to TensorBoard as eval_{split}/...; 0: never."""
    eval_samples: int = 64
    """Size of that fixed validation subset (all ranks together)."""

    def __post_init__(self):
        from modsquad_ds.config.schema import ConfigError

        def require(ok: bool, key: str, message: str) -> None:
            if not ok:
                raise ConfigError(key, message)

        require(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(0 <= self.min_lr <= self.lr, "min_lr", f"must be in [0, train.lr], got {self.min_lr}")
        require(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        require(0 <= self.warmup_steps <= self.steps, "warmup_steps",
                f"must be in [0, train.steps ({self.steps})], got {self.warmup_steps}"
                + (f"; for a run this short add --set train.warmup_steps={self.steps // 2}"
                   if self.warmup_steps > self.steps else ""))
        require(bool(self.ds_config), "ds_config", "must name a DeepSpeed JSON file")
        if self.zero_stage == 3:
            raise ConfigError("zero_stage", "3 is refused: Native DeepSpeed MoE is not supported with "
                              "ZeRO Stage 3; use 0, 1 or 2")
        require(self.zero_stage in (None, 0, 1, 2), "zero_stage", f"must be 0, 1 or 2, got {self.zero_stage}")
        require(self.precision in (None, "fp32", "bf16"), "precision",
                f"must be fp32 or bf16, got {self.precision!r}")
        require(self.grad_accum is None or self.grad_accum >= 1, "grad_accum",
                f"must be >= 1, got {self.grad_accum}")
        require(self.grad_clip is None or self.grad_clip >= 0, "grad_clip",
                f"must be >= 0 (0: no clipping), got {self.grad_clip}")
        require(self.ep_size >= 1, "ep_size", f"must be >= 1, got {self.ep_size}")
        require(self.checkpoint_every >= 0, "checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        require(self.keep_checkpoints >= 1, "keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")
        require(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        require(self.stop_after is None or self.stop_after >= 1, "stop_after",
                f"must be >= 1 or null, got {self.stop_after}")
        require(self.dist_timeout_s > 0, "dist_timeout_s", f"must be positive, got {self.dist_timeout_s}")
        require(self.heartbeat_timeout_s >= 0, "heartbeat_timeout_s",
                f"must be >= 0 (0: off), got {self.heartbeat_timeout_s}")
        require(self.eval_every >= 0, "eval_every", f"must be >= 0 (0: never), got {self.eval_every}")
        require(self.eval_samples >= 1, "eval_samples", f"must be >= 1, got {self.eval_samples}")
        require(self.nonfinite_patience >= 1, "nonfinite_patience",
                f"must be >= 1, got {self.nonfinite_patience}")
