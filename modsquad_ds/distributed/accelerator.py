"""DeepSpeed's accelerator follows the machine: CUDA where a GPU is visible, else the CPU.

DeepSpeed chooses its accelerator once, when it is first imported, from ``DS_ACCELERATOR`` or its own
detection; the commands that build an engine (train, evaluate, study) set the variable first, so the
engine and our tensors agree on the device. A ``DS_ACCELERATOR`` the user set wins. (The CPU-only
tools, export and reshard, pin ``cpu`` themselves.)
"""

from __future__ import annotations

import os


def pin_deepspeed_accelerator() -> str:
    """Set ``DS_ACCELERATOR`` unless set (before deepspeed is imported); returns its value."""
    import torch

    return os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
