"""Which kernel runs the experts: a per-expert loop or one grouped GEMM, chosen at run time.

- ``loop``: one matmul per expert on its contiguous chunk (Megatron's ``SequentialMLP``). Needs the
  per-expert counts on the host (one device-to-host sync per layer); fastest on CPUs, where large
  per-expert matmuls already saturate the cores and ``grouped_mm`` runs as a loop anyway
  (docs/benchmarks.md: 0.82x against 0.76x of the dense layer's speed at ViT-S shapes, fp32).
- ``grouped``: ``torch.nn.functional.grouped_mm`` over the expert-sorted rows with on-device
  offsets (torchtitan's ``GroupedExperts``): one launch for all experts, no host sync. Fused on
  sm90+ GPUs (H100/H200) in bfloat16.

``auto`` (the default) takes ``grouped`` where :func:`grouped_supported` says the fused kernel
exists for the device and dtype, else ``loop``. Override per layer (``layer.kernel = "loop"``),
for a whole model with :func:`set_kernel`, or for the process with ``MODSQUAD_MOE_KERNEL``.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

KERNELS = ("auto", "loop", "grouped")
ENV = "MODSQUAD_MOE_KERNEL"


def has_grouped_mm() -> bool:
    return hasattr(F, "grouped_mm")


_PROBED: dict[tuple, bool] = {}


@torch.compiler.assume_constant_result  # under torch.compile (model.compile): run eagerly, a constant
def grouped_supported(device_type: str, device_index: int | None, dtype: torch.dtype) -> bool:
    """True where ``grouped_mm`` is the fused kernel: CUDA sm90+ in bfloat16 (torch's documented
    requirement is bf16 on SM >= 80; the fused CUTLASS path needs sm90). Probed once per device."""
    key = (device_type, device_index, dtype)
    if key not in _PROBED:
        _PROBED[key] = _probe_grouped(device_type, device_index, dtype)
    return _PROBED[key]


def _probe_grouped(device_type: str, device_index: int | None, dtype: torch.dtype) -> bool:
    if not has_grouped_mm() or device_type != "cuda" or dtype != torch.bfloat16:
        return False
    if torch.cuda.get_device_capability(device_index) < (9, 0):
        return False
    # A tiny call, so that a build without the kernel falls back instead of failing mid-step. Its
    # offsets [4, 8] are made on the device (no blocking copy: the probe may run inside a step that
    # must not sync). Out of memory says nothing about the kernel: raised, and nothing is cached.
    try:
        a = torch.zeros(8, 16, device=torch.device(device_type, device_index), dtype=dtype)
        b = torch.zeros(2, 16, 16, device=a.device, dtype=dtype)
        F.grouped_mm(a, b, offs=torch.arange(4, 9, 4, device=a.device, dtype=torch.int32))
        return True
    except torch.cuda.OutOfMemoryError:
        raise
    except (RuntimeError, NotImplementedError):
        return False


def resolve(kernel: str, like: torch.Tensor, out_features: int | None = None) -> str:
    """The kernel to run for inputs like ``like`` (rows of ``in`` features) into ``out_features``: an
    explicit ``loop``/``grouped`` wins, then the environment variable, then the automatic choice.

    ``grouped_mm`` wants every row stride in 16-byte multiples, forward and backward: both widths
    (a head width of 76 in bf16 is 152 bytes). ``auto`` takes the loop for other widths; an explicit
    ``grouped`` says which width is wrong instead of failing inside the first step.
    """
    if kernel == "auto":
        kernel = os.environ.get(ENV, "auto")
    if kernel not in KERNELS:
        raise ValueError(f"MoE kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    widths = (like.shape[-1],) if out_features is None else (like.shape[-1], out_features)
    aligned = all(w * like.element_size() % 16 == 0 for w in widths)
    if kernel == "auto":
        d = like.device
        return "grouped" if aligned and grouped_supported(d.type, d.index, like.dtype) else "loop"
    if kernel == "grouped" and not has_grouped_mm():
        raise RuntimeError(f"MoE kernel 'grouped' needs torch.nn.functional.grouped_mm (torch {torch.__version__} lacks it)")
    if kernel == "grouped" and not aligned:
        per = 16 // like.element_size()
        raise ValueError(f"MoE kernel 'grouped' needs expert widths that are multiples of {per} in {like.dtype} "
                         f"(grouped_mm's 16-byte strides), got {' and '.join(map(str, widths))}; use kernel 'loop'")
    return kernel


class KernelChoice:
    """Mixin of the expert containers whose kernel :func:`set_kernel` chooses (``MLPExperts``,
    ``AttentionProjections``, the expert-parallel layer's ``BatchedExperts``)."""

    kernel: str = "auto"
    """``auto``, ``loop`` or ``grouped``."""


def set_kernel(model: nn.Module, kernel: str) -> int:
    """Set ``kernel`` on every expert container of ``model``; returns how many were set."""
    if kernel not in KERNELS:
        raise ValueError(f"MoE kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    n = 0
    for m in model.modules():
        if isinstance(m, KernelChoice):
            m.kernel = kernel
            n += 1
    return n
