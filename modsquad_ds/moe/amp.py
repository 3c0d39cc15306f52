"""Autocast queries that ``torch.compile`` can trace (``model.compile``).

``torch.amp.is_autocast_available`` calls a builtin that torch 2.11's compiler (the GPU machine's
torch; 2.14's traces it) cannot trace: every call inside a compiled block ended a graph there, and
the tiny preset's MoE blocks compiled to 15-17 graphs each instead of one, with eager Python between
them. The answer depends only on the device type, so it is looked up in a table made at import for
the device types we run on, which the compiler reads as a constant.
"""

from __future__ import annotations

import torch

_AVAILABLE = {device_type: torch.amp.is_autocast_available(device_type) for device_type in ("cpu", "cuda")}


def autocast_available(device_type: str) -> bool:
    """Whether autocast exists for ``device_type`` (not for ``meta``, say)."""
    known = _AVAILABLE.get(device_type)
    return torch.amp.is_autocast_available(device_type) if known is None else known


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``; False where the device type has none."""
    return autocast_available(device_type) and torch.is_autocast_enabled(device_type)
