"""The ``finetune`` section: learn new tasks on top of a trained run (paper Sec. 4.4, Fig. 4).

The run's ``tasks.names`` are the tasks to learn. The model is built for those tasks only, every
weight that is not task specific (patch embedding, attention and MLP experts, norms, dense layers)
is loaded from ``init_from``'s checkpoint, and ``mode`` chooses what trains:

- ``routers``: the paper's router fine-tuning: every MoE layer's routers of the new tasks, their
  task-embedding rows and heads; experts and every shared weight frozen;
- ``heads``: only the new heads (the paper's "Task" baseline: frozen backbone and routing);
- ``all``: every weight (the paper's "Fine-tuning" baseline);
- ``scratch`` (default): no source run; train every weight from its initialisation, as always.

The uncertainty task weights of the objective train in every mode (they weight losses, not
features). Whether the source exists and matches is checked before any process group starts
(modsquad_ds.finetune.source), not here: a saved config must load after its source is gone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

MODES = ("scratch", "routers", "heads", "all")


@dataclass
class FinetuneConfig:
    """Start from a trained run and learn new tasks (see the module docstring)."""

    mode: Literal["scratch", "routers", "heads", "all"] = "scratch"
    """What trains: routers (+ task embedding + heads), heads, all, or scratch (no source run)."""
    init_from: Optional[str] = None
    """Run folder of a trained run (its config.yaml and checkpoints/); required unless mode is scratch."""
    step: Optional[int] = None
    """Checkpoint step of init_from to start from; null: its newest complete checkpoint."""
    init_tasks: dict[str, str] = field(default_factory=dict)
    """New task -> source task whose routers and task-embedding row it starts from (the new head is
    always fresh); a new task not listed starts with freshly initialised routers and embedding."""

    def __post_init__(self):
        from modsquad_ds.config.schema import ConfigError

        if self.mode not in MODES:
            raise ConfigError("mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "scratch":
            if self.init_from is not None:
                raise ConfigError("mode", "is 'scratch' but finetune.init_from is set; choose routers, "
                                  "heads or all to start from that run")
            if self.init_tasks or self.step is not None:
                raise ConfigError("mode", "is 'scratch': finetune.step and finetune.init_tasks need "
                                  "finetune.init_from and a mode of routers, heads or all")
        elif not self.init_from:
            raise ConfigError("init_from", f"must name a trained run folder when finetune.mode is {self.mode!r}")
        if self.step is not None and self.step < 1:
            raise ConfigError("step", f"must be >= 1 or null (newest), got {self.step}")

    @property
    def enabled(self) -> bool:
        return self.mode != "scratch"
