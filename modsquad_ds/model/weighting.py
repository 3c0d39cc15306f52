"""Task weighting for the total loss (paper eq. 7).

Uncertainty weighting (Kendall et al. 2018, as in the reference code) learns s_t = log sigma_t^2
per task and adds ``0.5 * exp(-s_t) * L_t + log(1 + exp(s_t))``; the second term keeps sigma from
growing without bound. Fixed weighting multiplies by constants. ``weights()`` gives each task's
factor on its loss (detached, on the device: the trainer logs them as ``weight/<task>``, so the
learned weights show in TensorBoard).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class UncertaintyWeighting(nn.Module):
    def __init__(self, task_names: Sequence[str]):
        super().__init__()
        self.task_names = list(task_names)
        self.log_vars = nn.Parameter(torch.zeros(len(self.task_names)))

    def forward(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        total = self.log_vars.new_zeros(())
        for name, loss in losses.items():
            s = self.log_vars[self.task_names.index(name)]
            total = total + 0.5 * torch.exp(-s) * loss + F.softplus(s)
        return total

    def weights(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.task_names, (0.5 * torch.exp(-self.log_vars.detach())).unbind()))


class FixedWeighting(nn.Module):
    def __init__(self, task_names: Sequence[str], weights: Mapping[str, float]):
        super().__init__()
        self.task_names = list(task_names)
        self.register_buffer("task_weights", torch.tensor([float(weights.get(n, 1.0)) for n in self.task_names]))

    def forward(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        total = self.task_weights.new_zeros(())
        for name, loss in losses.items():
            total = total + self.task_weights[self.task_names.index(name)] * loss
        return total

    def weights(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.task_names, self.task_weights.unbind()))
