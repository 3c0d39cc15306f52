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


def free_memory_from_cuda(accelerator) -> bool:
    """Make a CUDA ``accelerator`` answer ``available_memory`` from CUDA, not NVML. Returns whether it did.

    ZeRO 1 and 2 ask it at engine build (to decide where to flatten the parameters). Where ``pynvml``
    is installed, DeepSpeed 0.19.8 looks the device up in NVML by index, after mapping the CUDA index
    through ``CUDA_VISIBLE_DEVICES`` with ``int()``: a GPU or MIG UUID there (valid for CUDA; how MIG
    slices and PBS's cgroups name devices) raises ``ValueError`` inside ``deepspeed.initialize``
    (DeepSpeed issue 5278), and NVML's index order (PCI bus) need not be CUDA's anyway.
    ``cudaMemGetInfo`` asks the driver about the device this process uses, however it was named.
    """
    if accelerator.device_name() != "cuda":
        return False
    accelerator.available_memory = _cuda_free_bytes  # this instance only: the class stays DeepSpeed's
    return True


def _cuda_free_bytes(device_index=None) -> int:
    import torch

    return torch.cuda.mem_get_info(device_index)[0]
