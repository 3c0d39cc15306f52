"""Mixture-of-experts layers: per-task routers, dropless dispatch, experts, routing losses."""

from modsquad_ds.moe.attention import MoEAttention
from modsquad_ds.moe.layer import MoEMlp
from modsquad_ds.moe.losses import load_balancing_loss, mutual_information
from modsquad_ds.moe.router import RoutingResult, TaskRouter
from modsquad_ds.moe.stats import RoutingStats

__all__ = ["MoEAttention", "MoEMlp", "RoutingResult", "RoutingStats", "TaskRouter",
           "load_balancing_loss", "mutual_information"]
