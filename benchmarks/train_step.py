"""A whole training step (forward, losses, backward, AdamW) of Mod-Squad against the dense MTL ViT of
the same width and depth (the paper's MTL baseline), side by side in one run.

Variants: ``dense`` (build_dense_peer), ``modsquad`` (task-batched: all tasks in one pass),
``modsquad+ckpt`` (model.grad_checkpointing), ``modsquad+compile`` (model.compile, with
``--compile``), and ``loop`` (one forward per task, the reference
code's way; benchmarks/task_batched.py has its details). Plain PyTorch, no engine: the model's cost
alone. On CUDA: bf16 autocast and fused AdamW, and each variant's own peak memory (its weights and
AdamW state, plus the most one step adds, from the allocator). On CPU: fp32 and,
as the memory figure, the bytes autograd keeps for backward (distinct saved storages, parameters left
out), measured on one step.

On CUDA two more columns say who sets the pace: ``GPU busy`` is the sum of one step's kernel times
(torch.profiler) over the step's time; near 100% the GPU is the bottleneck, well below it the host
does not issue the work fast enough (issue 7's first profile: 158 ms of kernels in a 346 ms step).
``issued`` is when the host had queued the whole step, as a share of the step (CUDA's launch queue
holds about a thousand kernels, so a host far ahead of the GPU waits there: near 100% alone is not
conclusive, well below it is).

    python benchmarks/train_step.py --presets tiny small --batch 2 --repeats 3     # CPU
    python benchmarks/train_step.py --presets small base --batch 16                # CUDA
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli import one_line_errors, positive  # noqa: E402
from task_batched import step_loop  # noqa: E402  (one forward per task; reused, not duplicated)

from modsquad_ds.config import load_config  # noqa: E402
from modsquad_ds.data.synthetic import synthetic_batch  # noqa: E402
from modsquad_ds.model import build_dense_peer, build_model  # noqa: E402
from modsquad_ds.model.objective import MultiTaskObjective  # noqa: E402
from modsquad_ds.plan.measure import saved_bytes  # noqa: E402
from modsquad_ds.train.module import to_device  # noqa: E402


def _step_batched(model, objective, batch):
    loss, _ = objective(model(batch["image"]), batch)
    loss.backward()


class Variant:
    def __init__(self, name, model, objective, step, device, bf16=None):
        """``bf16``: autocast to bfloat16 (default: on CUDA, not on CPU)."""
        self.name, self.model, self.objective, self.step = name, model.to(device), objective.to(device), step
        params = list(self.model.parameters()) + list(self.objective.parameters())
        self.opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
        self.device = device
        self.bf16 = device.type == "cuda" if bf16 is None else bf16

    def __call__(self, batch):
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16
                    else contextlib.nullcontext())
        with autocast:
            self.step(self.model, self.objective, batch)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _saved_bytes(variant, batch) -> int:
    """The activations of one step: distinct storages saved for backward, parameters left out."""
    return saved_bytes(lambda: variant(batch), [*variant.model.parameters(), *variant.objective.parameters()])


def _resident_bytes(variant) -> int:
    """What a variant holds between steps: its weights and AdamW's state (its gradients are freed)."""
    tensors = [*variant.model.parameters(), *variant.objective.parameters()]
    tensors += [t for state in variant.opt.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _peak_bytes(variant, batch) -> int:
    """The variant's own peak over one step: what it holds between steps plus the most the step adds.
    Every variant's weights sit on the GPU together, so the allocator's peak alone would count the
    others' too, and its rise over the start alone would leave out this variant's weights and state."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    variant(batch)
    torch.cuda.synchronize()
    return _resident_bytes(variant) + torch.cuda.max_memory_allocated() - base


def _gpu_busy_ms(variant, batch) -> float | None:
    """Sum of one step's CUDA kernel times, in ms (None where the profiler cannot trace CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            variant(batch)
            torch.cuda.synchronize()
        return sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
    except (RuntimeError, AssertionError) as err:  # CUPTI missing on this machine
        print(f"(no GPU busy time: {err})", file=sys.stderr)
        return None


def run_preset(preset, batch_size, repeats, device, with_loop=True, with_compile=False):
    cfg = load_config(preset=preset)
    batch = to_device(synthetic_batch(cfg.tasks.names, batch_size, cfg.model.img_size,
                                      torch.Generator().manual_seed(0)), device)
    torch.manual_seed(0)
    variants = [Variant("dense", build_dense_peer(cfg), MultiTaskObjective(cfg), _step_batched, device),
                Variant("modsquad", build_model(cfg), MultiTaskObjective(cfg), _step_batched, device)]
    ckpt_model = build_model(cfg)
    ckpt_model.set_grad_checkpointing(True)
    variants.append(Variant("modsquad+ckpt", ckpt_model, MultiTaskObjective(cfg), _step_batched, device))
    if with_loop:
        variants.append(Variant("loop", build_model(cfg), MultiTaskObjective(cfg), step_loop, device))
    if with_compile:  # model.compile: torch.compile per block; the warm-up step below compiles
        compiled = build_model(cfg)
        compiled.compile_blocks()
        variants.append(Variant("modsquad+compile", compiled, MultiTaskObjective(cfg), _step_batched, device))
    memory = {}
    for v in variants:  # warm-up, and the memory figure
        v(batch)
        memory[v.name] = _peak_bytes(v, batch) if device.type == "cuda" else _saved_bytes(v, batch)
    times, issued = {v.name: [] for v in variants}, {v.name: [] for v in variants}
    for _ in range(repeats):  # round robin
        for v in variants:
            _sync(device)
            t0 = time.perf_counter()
            v(batch)
            issued[v.name].append(time.perf_counter() - t0)
            _sync(device)
            times[v.name].append(time.perf_counter() - t0)
    ms = {k: statistics.median(t) * 1e3 for k, t in times.items()}
    # not for the loop over tasks: seconds of profiling on the GPU check's budget for a known-slow peer
    busy = {v.name: _gpu_busy_ms(v, batch) if device.type == "cuda" and v.name != "loop" else None
            for v in variants}
    return {k: {"ms": ms[k], "dense_ms/ms": ms["dense"] / ms[k], "memory_bytes": memory[k],
                "memory_vs_dense": memory[k] / memory["dense"],
                # on the CPU every op runs as it is issued: a share only on CUDA
                "issued_pct": 100 * statistics.median(issued[k]) * 1e3 / ms[k] if device.type == "cuda" else None,
                "gpu_busy_ms": busy[k], "gpu_busy_pct": None if busy[k] is None else 100 * busy[k] / ms[k]}
            for k in ms}


@one_line_errors
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=None, help="default: tiny small (CPU), small base (CUDA)")
    parser.add_argument("--batch", type=positive, default=None, help="images per step (default 2 CPU, 16 CUDA)")
    parser.add_argument("--repeats", type=positive, default=None, help="timed steps per variant (default 3 CPU, 10 CUDA)")
    parser.add_argument("--threads", type=positive, default=2)
    parser.add_argument("--no-loop", action="store_true", help="leave out the loop over tasks (slow)")
    parser.add_argument("--compile", action="store_true",
                        help="add Mod-Squad with model.compile (torch.compile per block; compiling takes tens of seconds)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.set_num_threads(args.threads)
    presets = args.presets or (["small", "base"] if cuda else ["tiny", "small"])
    batch, repeats = args.batch or (16 if cuda else 2), args.repeats or (10 if cuda else 3)
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    mem = "peak (weights+Adam+step)" if cuda else "saved for backward"
    print(f"torch {torch.__version__}, {where}, {'bf16 autocast' if cuda else 'fp32'}, {batch} images x 13 tasks, "
          f"median of {repeats}")
    results = {}
    for preset in presets:
        res = run_preset(preset, batch, repeats, device, with_loop=not args.no_loop, with_compile=args.compile)
        results[preset] = res
        print(f"\n== {preset} ==\n{'variant':<17}{'ms':>10}{'vs dense':>10}{'MiB ' + mem:>28}{'vs dense':>10}"
              f"{'GPU busy':>10}{'issued':>8}")
        for name, r in res.items():
            busy, issued = ("-" if r[key] is None else f"{r[key]:.0f}%" for key in ("gpu_busy_pct", "issued_pct"))
            print(f"{name:<17}{r['ms']:>10.1f}{r['dense_ms/ms']:>9.2f}x{r['memory_bytes'] / 2**20:>28.0f}"
                  f"{r['memory_vs_dense']:>9.2f}x{busy:>10}{issued:>8}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": where, "batch": batch, "presets": results}, indent=1))


if __name__ == "__main__":
    main()
