"""Measure what the planner predicts: peak memory of a real training step, and activation bytes.

The step is the trainer's own: ``train.trainer.build_engine`` (model, expert-parallel conversion,
AdamW with MoE parameter groups, a DeepSpeed engine with the given ZeRO stage) on one process.

How CPU peak memory is measured, and why not RSS: ``torch.profiler`` with ``profile_memory=True``
records every allocation and free of PyTorch's CPU allocator as a ``[memory]`` event with a signed
byte count. Profiling from before the model is built to after the second step, the running sum of
those events in time order is exactly the bytes held by tensors at each moment, and its maximum
during the second step is the step's peak. RSS would add the Python heap, the interpreter, shared
libraries and glibc's retained free lists (pages freed by ``free`` stay in RSS until trimmed), and
pages of ``torch.empty`` buffers that were never written are not resident at all: it moves by tens
of MB between identical runs, more than the tiny preset's whole step. On a GPU,
``torch.cuda.max_memory_allocated`` counts the same thing (tensor bytes of the caching allocator).

Activation bytes are measured separately with ``torch.autograd.graph.saved_tensors_hooks``: the
bytes of every distinct storage autograd saves for backward during one forward.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Callable, Iterable

import torch


@dataclass
class MeasuredStep:
    before_step_bytes: int
    """Tensor bytes held between steps 1 and 2: weights, optimizer state, persistent DeepSpeed buffers."""
    peak_bytes: int
    """Highest tensor bytes held at any moment of step 2 (forward, backward, optimizer step)."""
    saved_activation_bytes: int
    """Bytes of the distinct storages autograd saved for backward in one forward (the model's part)."""
    device: str
    """Where the steps ran, DeepSpeed's accelerator: ``cuda`` or ``cpu`` (the planner's ``device``)."""


def _engine(cfg, zero: int, dtype: str, micro_batch: int):
    """The trainer's engine with a DeepSpeed config shaped like the shipped ds_configs/*.json, at the
    stage the run trains at (fine-tuning modes routers and heads: 0, finetune.source.zero_stage),
    for a fine-tuning run without its source run's weights (memory does not depend on them)."""
    from modsquad_ds.finetune.source import zero_stage
    from modsquad_ds.plan.memory import REDUCE_BUCKET_ELEMENTS
    from modsquad_ds.train.trainer import build_engine

    zero = zero_stage(cfg, zero)
    ds = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
          "gradient_clipping": 1.0, "steps_per_print": 10**9, "wall_clock_breakdown": False,
          "zero_optimization": {"stage": zero, "contiguous_gradients": True, "overlap_comm": False,
                                "reduce_bucket_size": REDUCE_BUCKET_ELEMENTS,
                                "allgather_bucket_size": REDUCE_BUCKET_ELEMENTS},
          "bf16": {"enabled": dtype == "bf16"}, "zero_allow_untested_optimizer": True}
    return build_engine(cfg, ds, source_weights=False)


def saved_activation_bytes(module, batch) -> int:
    """Distinct storage bytes autograd keeps for backward during ``module(batch)``."""
    return saved_bytes(lambda: module(batch), module.parameters())


def saved_bytes(run: Callable[[], object], params: Iterable[torch.Tensor]) -> int:
    """Distinct storage bytes autograd keeps for backward while ``run()`` runs, less ``params`` (a
    Linear saves its weight too: parameters are not activations). Views of one buffer count once,
    at its full size, and so does a tensor two functions save (a layer's input, saved by its router
    and by its experts)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.device.type != "meta":
            s = t.untyped_storage()
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    held = {p.untyped_storage().data_ptr() for p in params}
    return sum(n for ptr, n in seen.items() if ptr not in held)


def _on_cuda() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cuda"


def _to(batch: dict, device) -> dict:
    return {k: ({n: t.to(device) for n, t in v.items()} if isinstance(v, dict)
                else v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def measure_step(cfg, micro_batch: int, zero: int = 1, dtype: str = "fp32") -> MeasuredStep:
    """Two training steps of ``cfg`` on this process (a process group must exist: world of one or
    more); on DeepSpeed's CUDA accelerator the peak is ``torch.cuda.max_memory_allocated``."""
    from torch.profiler import ProfilerActivity, profile

    from modsquad_ds.data.synthetic import synthetic_batch

    gen = torch.Generator().manual_seed(0)
    batch = synthetic_batch(cfg.tasks.names, micro_batch, cfg.model.img_size, generator=gen)
    # Garbage from before (a previous measurement's engine: DeepSpeed's hold reference cycles) freed
    # during the measurement would count as negative bytes and lower what it says is held.
    gc.collect()
    if _on_cuda():
        return _measure_cuda(cfg, batch, micro_batch, zero, dtype)
    # kineto's own log lines (profiler start/stop, "gpuGetDeviceCount failed" on a machine without a
    # GPU) say nothing about the measurement; its level is read when the profiler first starts
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        engine = _engine(cfg, zero, dtype, micro_batch)
        engine.train()
        for name in ("modsquad_step1", "modsquad_step2"):
            gc.collect()  # what reference cycles still hold is garbage, not the step's memory
            with torch.profiler.record_function(name):
                _step(engine, batch)
    events = prof.profiler.kineto_results.events()
    step = next(e for e in events if e.name() == "modsquad_step2")
    memory = sorted((e.start_ns(), e.nbytes()) for e in events
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    held, before, peak = 0, None, 0
    for t, n in memory:
        if before is None and t >= step.start_ns():
            before = peak = held
        held += n
        if before is not None and t <= step.end_ns():
            peak = max(peak, held)
    acts = saved_activation_bytes(engine.module, batch)
    return MeasuredStep(before_step_bytes=before, peak_bytes=peak, saved_activation_bytes=acts, device="cpu")


def _step(engine, batch) -> None:
    loss, *_ = engine(batch)
    engine.backward(loss)
    engine.step()


def _measure_cuda(cfg, batch, micro_batch: int, zero: int, dtype: str) -> MeasuredStep:
    """The caching allocator's own counters: bytes of live tensors, as the CPU path counts them."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()  # whatever this process held before (the batch lives on CPU)
    engine = _engine(cfg, zero, dtype, micro_batch)
    engine.train()
    batch = _to(batch, engine.device)
    _step(engine, batch)
    torch.cuda.synchronize()
    batch_bytes = sum(t.numel() * t.element_size() for t in _tensors(batch))
    before = torch.cuda.memory_allocated() - base - batch_bytes
    torch.cuda.reset_peak_memory_stats()
    _step(engine, batch)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base - batch_bytes
    acts = saved_activation_bytes(engine.module, batch)
    return MeasuredStep(before_step_bytes=before, peak_bytes=peak, saved_activation_bytes=acts, device="cuda")


def _tensors(batch: dict):
    for v in batch.values():
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, dict):
            yield from (t for t in v.values() if isinstance(t, torch.Tensor))
