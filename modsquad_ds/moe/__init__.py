"""Mixture-of-experts layers: per-task routers, dropless dispatch, experts, routing losses.

Shape letters in tensor names (``x_TBND``, ``gates_NK``), the same in every file of the package:

- ``T`` task slots of a task-batched forward (one per task run on the batch)
- ``B`` images per task slot, ``N`` tokens per image (in dispatch.py: ``N`` tokens in all, T*B*N)
- ``S`` tokens per task slot (B*N) in router.py and stats.py; in dispatch.py and experts.py ``S``
  is the number of (token, choice) slots, N*K, sorted by expert
- ``D`` model width, ``H`` expert hidden width (attention: head width), ``I``/``O`` a projection's
  input/output width
- ``E`` experts, ``K`` experts per token (top-k), ``C`` capacity (rows per expert in DeepSpeed's
  equal-capacity buffer), ``M`` rows per expert in a batched matmul
"""

from modsquad_ds.moe.attention import MoEAttention
from modsquad_ds.moe.layer import MoEMlp
from modsquad_ds.moe.losses import load_balancing_loss, mutual_information
from modsquad_ds.moe.router import RoutingResult, TaskRouter
from modsquad_ds.moe.stats import RoutingStats

__all__ = ["MoEAttention", "MoEMlp", "RoutingResult", "RoutingStats", "TaskRouter",
           "load_balancing_loss", "mutual_information"]
