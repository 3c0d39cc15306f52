"""A batch as one block of shared memory, so that it leaves a loader worker in one piece.

A DataLoader worker hands the main process every tensor of a batch as a shared-memory segment of its
own: created and filled in the worker, then, under torch's default ``file_descriptor`` sharing, its
descriptor fetched by the main process over a fresh connection to the worker, and mapped. A Taskonomy
batch holds 21 tensors (the image, 13 targets, 7 masks): 7.5 ms of the main process per batch in the
demo's training loop (8 images, one worker; the step around it about 90 ms), however small the batch.
Packed into one block, the batch crosses as one segment; unpacking makes views into it, not copies,
and where CUDA is present the pin thread pins one block instead of 21 tensors.

    packed = pack(batch)          # in the worker: every tensor copied into one (shared) byte buffer
    batch = packed.unpack()       # in the main process: the same nested batch, its tensors views
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.data import get_worker_info

ALIGN = 64
"""Every tensor starts on a 64-byte boundary: a cache line, and a multiple of every dtype's size (a
view of another dtype needs its offset aligned)."""


@dataclass(frozen=True)
class _Slot:
    """Where a tensor was in the batch: its number in ``PackedBatch.layout``."""

    index: int


@dataclass(frozen=True)
class PackedBatch:
    buffer: torch.Tensor
    """(bytes,) uint8: every tensor of the batch, each at its offset."""
    layout: tuple[tuple[torch.dtype, tuple[int, ...], int], ...]
    """(dtype, shape, byte offset) of each tensor, in slot order."""
    skeleton: Any
    """The batch with each tensor replaced by its ``_Slot``; other values as they were."""

    def pin_memory(self) -> "PackedBatch":
        """What DataLoader's pin thread calls (``pin_memory=True``): one pinned block."""
        return replace(self, buffer=self.buffer.pin_memory())

    def unpack(self) -> Any:
        """The batch as it was packed, each tensor a contiguous view into the buffer."""
        views = [_view(self.buffer, dtype, shape, offset) for dtype, shape, offset in self.layout]
        return _fill(self.skeleton, views)


def pack(batch: Any) -> PackedBatch:
    """``batch`` (tensors in nested dicts, lists and tuples) copied into one byte buffer, in shared
    memory when called in a loader worker (so sending it copies nothing more)."""
    tensors: list[torch.Tensor] = []
    skeleton = _hollow(batch, tensors)
    layout, size = [], 0
    for t in tensors:
        size = -(-size // ALIGN) * ALIGN
        layout.append((t.dtype, tuple(t.shape), size))
        size += t.nbytes
    buffer = _shared_bytes(size) if get_worker_info() is not None else torch.empty(size, dtype=torch.uint8)
    for t, (dtype, shape, offset) in zip(tensors, layout):
        _view(buffer, dtype, shape, offset).copy_(t)
    return PackedBatch(buffer, tuple(layout), skeleton)


def unpacked(batch: Any) -> Any:
    """``batch`` unpacked if it is a PackedBatch, else as it is (a loader without workers)."""
    return batch.unpack() if isinstance(batch, PackedBatch) else batch


def _view(buffer: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], offset: int) -> torch.Tensor:
    nbytes = math.prod(shape) * dtype.itemsize
    return buffer[offset:offset + nbytes].view(dtype).view(shape)


def _shared_bytes(size: int) -> torch.Tensor:
    """A uint8 tensor of ``size`` bytes allocated in shared memory (as DataLoader's default_collate
    allocates a batch in a worker), rather than allocated and later moved there by a copy."""
    storage = torch.UntypedStorage._new_shared(size)
    return torch.empty(0, dtype=torch.uint8).set_(storage)


def _hollow(value: Any, tensors: list[torch.Tensor]) -> Any:
    if torch.is_tensor(value):
        tensors.append(value)
        return _Slot(len(tensors) - 1)
    if isinstance(value, dict):
        return {k: _hollow(v, tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_hollow(v, tensors) for v in value)
    return value


def _fill(value: Any, views: list[torch.Tensor]) -> Any:
    if isinstance(value, _Slot):
        return views[value.index]
    if isinstance(value, dict):
        return {k: _fill(v, views) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_fill(v, views) for v in value)
    return value
