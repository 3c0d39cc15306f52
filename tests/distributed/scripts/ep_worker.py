"""One rank of the expert-parallel equivalence checks (run by tests/distributed/test_ep_equivalence.py).

Usage: ep_worker.py OUT CHECK   with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set.

Every rank builds the single-process reference itself (same seed, same global batch, plain MoEMlp
model, no DeepSpeed) and the expert-parallel model on a real DeepSpeed engine fed with its own
share of the images, then writes the differences it measured to OUT/rank{r}.json; the test asserts.

Checks: ``equivalence`` (ZeRO 0/1/2, router noise off and on) and ``checkpoint`` (save/load).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

T0 = time.perf_counter()
torch.set_num_threads(1)

TASKS = ["class_scene", "edge_texture", "keypoints2d"]  # unmasked losses: a mean of halves is the mean
GLOBAL_BATCH = 4
"""Images per step at 2 and 4 ranks; larger worlds take one image per rank (:func:`global_size`)."""
ADAM_EPS = 1e-6


class TrainModule(nn.Module):
    """Model and objective in one module, so the engine also averages the task-weighting parameters."""

    def __init__(self, model, objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch, reduce_table=None):
        out = self.model(batch["image"])
        loss, stats = self.objective(out, batch, reduce_table=reduce_table)
        return loss, out, stats


def build(cfg, seed: int = 0) -> TrainModule:
    from modsquad_ds.model.factory import build_model
    from modsquad_ds.model.objective import MultiTaskObjective

    torch.manual_seed(seed)
    return TrainModule(build_model(cfg), MultiTaskObjective(cfg))


def config(noise: bool):
    from modsquad_ds.config import load_config

    return load_config(preset="tiny", overrides=[f"tasks.names=[{','.join(TASKS)}]", f"moe.router_noise={str(noise).lower()}",
                                                 "loss.aux=mi", "loss.w_mi=0.05"])


def global_size(world: int) -> int:
    return max(GLOBAL_BATCH, world)


def global_batch(cfg, world: int):
    from modsquad_ds.data.synthetic import synthetic_batch

    return synthetic_batch(TASKS, global_size(world), cfg.model.img_size, generator=torch.Generator().manual_seed(123))


def shard(batch, rank: int, world: int):
    n = batch["image"].shape[0] // world
    sl = slice(rank * n, (rank + 1) * n)
    return {"image": batch["image"][sl], "targets": {k: v[sl] for k, v in batch["targets"].items()},
            "masks": {k: v[sl] for k, v in batch["masks"].items()}, "keys": batch["keys"][sl]}


@contextlib.contextmanager
def global_noise(rank: int, world: int):
    """Router noise as one global stream: call i of ``randn_like`` on a (T, S, E) logits tensor returns
    rank ``rank``'s token slice of a (T, S * world, E) draw seeded by i. Tokens are image-major, so this
    is exactly the noise the single-process model draws for the same tokens (world=1)."""
    counter = itertools.count()
    original = torch.randn_like

    def randn_like(t, **kwargs):
        i = next(counter)
        tt, s, e = t.shape
        full = torch.randn(tt, s * world, e, generator=torch.Generator().manual_seed(1000 + i), dtype=t.dtype)
        return full[:, rank * s:(rank + 1) * s].contiguous()

    torch.randn_like = randn_like
    try:
        yield
    finally:
        torch.randn_like = original


def ds_config(stage: int, micro_batch: int, clip: float = 0.0) -> dict:
    return {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
            "gradient_clipping": clip, "steps_per_print": 10**9, "wall_clock_breakdown": False}


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def reference_step(cfg, batch, lr, wd):
    """Single process on the whole batch: outputs, losses, grads and params after one AdamW step."""
    from modsquad_ds.moe.ds_adapter import moe_param_groups

    ref = build(cfg)
    ref.train()
    loss, out, stats = ref(batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in ref.named_parameters()}
    opt = torch.optim.AdamW(moe_param_groups(ref, wd), lr=lr, eps=ADAM_EPS)
    opt.step()
    params = {n: p.detach().clone() for n, p in ref.named_parameters()}
    return out, stats, grads, params


def ep_engine(cfg, stage: int, ep_size: int, micro_batch: int, lr: float, wd: float, seed: int = 0, clip: float = 0.0):
    import deepspeed

    from modsquad_ds.moe.ds_adapter import convert_to_expert_parallel, moe_param_groups

    module = build(cfg, seed)
    convert_to_expert_parallel(module.model, ep_size)
    opt = torch.optim.AdamW(moe_param_groups(module, wd), lr=lr, eps=ADAM_EPS)
    engine, *_ = deepspeed.initialize(model=module, optimizer=opt, config=ds_config(stage, micro_batch, clip))
    return engine


def ref_name(name: str, module) -> str:
    """Reference (MoEMlp) name of an expert-parallel parameter, with the global expert id."""
    from modsquad_ds.moe.ds_adapter import ExpertParallelMoEMlp, reference_key

    for path, layer in module.named_modules():
        if isinstance(layer, ExpertParallelMoEMlp) and name.startswith(path + ".deepspeed_moe.experts."):
            local = int(name[len(path + ".deepspeed_moe.experts.deepspeed_experts."):].split(".")[0])
            return reference_key(name, layer.global_expert_ids()[local])
    return reference_key(name)


def check_equivalence(rank: int, world: int, ep_size: int | None = None, cases: str | None = None,
                      prefix: str = "") -> dict:
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    from modsquad_ds.distributed.collectives import all_reduce_sum_autograd

    lr, wd = 1e-3, 0.05
    results = {}
    ep_size = ep_size or world
    for stage, noise in [(0, False), (0, True), (1, True), (2, True)]:
        key = f"zero{stage}_noise{int(noise)}"
        if cases and key not in cases.split(","):
            continue
        key = prefix + key
        cfg = config(noise)
        batch = global_batch(cfg, world)
        with global_noise(0, 1):
            out_ref, stats_ref, grads_ref, params_ref = reference_step(cfg, batch, lr, wd)
        engine = ep_engine(cfg, stage, ep_size=ep_size, micro_batch=global_size(world) // world, lr=lr, wd=wd)
        module = engine.module
        local = shard(batch, rank, world)
        with global_noise(rank, world):
            loss, out, stats = engine(local, reduce_table=all_reduce_sum_autograd)
        engine.backward(loss)

        r = {"outputs": {}, "grads": {}, "params": {}, "routing": {}, "losses": {}}
        n = global_size(world) // world
        for task, pred in out.preds.items():
            r["outputs"][task] = rel_diff(pred, out_ref.preds[task][rank * n:(rank + 1) * n])
        for s, s_ref in zip(out.routing, out_ref.routing):
            table = all_reduce_sum_autograd(s.prob_table_TE.detach())
            counts = all_reduce_sum_autograd(s.count_table_TE)
            r["routing"][s.layer] = [rel_diff(table, s_ref.prob_table_TE), rel_diff(counts, s_ref.count_table_TE)]
        for name, value in stats.items():
            if name.startswith("loss/") and name != "loss/total" and name != "loss/aux":
                mean = value.detach().clone()
                dist.all_reduce(mean)
                r["losses"][name] = rel_diff(mean / world, stats_ref[name])
            elif name.startswith("mi/"):
                r["losses"][name] = rel_diff(value, stats_ref[name])
        names = [n for n, _ in module.named_parameters()]
        for name, p in module.named_parameters():  # collective under ZeRO 1/2: same order on all ranks
            g = safe_get_full_grad(p)
            r["grads"][ref_name(name, module)] = rel_diff(g, grads_ref[ref_name(name, module)])
        # the per-task slices of every router, the "task-router gradients"
        for name, p in module.named_parameters():
            if name.endswith("task_wg"):
                g = safe_get_full_grad(p)
                g_ref = grads_ref[ref_name(name, module)]
                for t in range(g.shape[0]):
                    r["grads"][f"{ref_name(name, module)}[task {t}]"] = rel_diff(g[t], g_ref[t])
        r["grad_norm"] = _grad_norms(engine, stage, grads_ref)
        engine.step()
        if stage > 0:
            r["grad_norm"]["deepspeed"] = float(engine.get_global_grad_norm())
        for name, p in module.named_parameters():  # in units of the learning rate (one Adam step ~ lr)
            want = params_ref[ref_name(name, module)]
            r["params"][ref_name(name, module)] = float((p.detach() - want).abs().max() / lr)
        r["num_params"] = len(names)
        r["experts_here"] = sorted({int(k.split(".experts.experts.")[1].split(".")[0])
                                    for k in r["grads"] if ".experts.experts." in k})
        results[key] = r
        del engine
    return results


def _grad_norms(engine, stage: int, grads_ref) -> dict:
    """The global gradient norm clipping would use, and the 1-process one. ZeRO 0: ours and DeepSpeed's
    (its clip_grad_norm_); ZeRO 1/2: DeepSpeed's, read by the caller after the step."""
    from deepspeed.runtime.utils import clip_grad_norm_ as ds_clip

    from modsquad_ds.moe.ds_adapter import clip_grad_norm_

    ref = float(torch.sqrt(sum(g.double().pow(2).sum() for g in grads_ref.values())))
    out = {"ref": ref}
    if stage == 0:
        out["ours"] = float(clip_grad_norm_(engine.module, 0.0))
        out["deepspeed_zero0"] = float(ds_clip(list(engine.module.parameters()), max_norm=1e30))
    return out


def check_checkpoint(rank: int, world: int, out_dir: Path) -> dict:
    """Train one step at ep_size=world, save, load into a differently seeded model: same weights,
    same outputs; the files hold one expert each under its global id; a single-process (ep_size 1)
    module-only load gives the gathered model."""
    import torch.distributed as dist

    from modsquad_ds.moe.ds_adapter import ExpertParallelMoEMlp, convert_to_single_process, expert_checkpoint_name

    cfg = config(False)
    batch = global_batch(cfg, world)
    local = shard(batch, rank, world)
    n = global_size(world) // world
    engine = ep_engine(cfg, 0, ep_size=world, micro_batch=n, lr=1e-3, wd=0.05)
    loss, _, _ = engine(local)
    engine.backward(loss)
    engine.step()
    ckpt = out_dir / "ckpt"
    engine.save_checkpoint(str(ckpt), tag="step1")
    dist.barrier()
    r = {}
    files = sorted(p.name for p in (ckpt / "step1").iterdir())
    layers = [m for m in engine.module.modules() if isinstance(m, ExpertParallelMoEMlp)]
    num_experts = layers[0].num_experts
    expected = [expert_checkpoint_name(L, e) for L in range(len(layers)) for e in range(num_experts)]
    r["files"] = files
    r["missing_expert_files"] = [f for f in expected if f not in files]
    # each expert file holds exactly that global expert's weights, equal to the owner's live weights
    file_mismatch = []
    for L, layer in enumerate(layers):
        for local_id, global_id in enumerate(layer.global_expert_ids()):
            state = torch.load(ckpt / "step1" / expert_checkpoint_name(L, global_id), map_location="cpu")
            want = {k: v for k, v in layer.local_experts[local_id].state_dict().items()}
            keys_ok = all(f".deepspeed_experts.{global_id}." in k for k in state)
            vals = {k.split(f".deepspeed_experts.{global_id}.")[1]: v for k, v in state.items()}
            if not keys_ok or set(vals) != set(want) or any(not torch.equal(vals[k], want[k]) for k in want):
                file_mismatch.append(expert_checkpoint_name(L, global_id))
    r["file_mismatch"] = file_mismatch

    saved = {k: v.clone() for k, v in engine.module.state_dict().items()}
    engine.module.eval()
    with torch.no_grad():
        _, out_saved, _ = engine(local)
    fresh = ep_engine(cfg, 0, ep_size=world, micro_batch=n, lr=1e-3, wd=0.05, seed=7)
    differs_before = any(not torch.equal(v, saved[k]) for k, v in fresh.module.state_dict().items())
    fresh.load_checkpoint(str(ckpt), tag="step1")
    loaded = fresh.module.state_dict()
    r["differs_before_load"] = differs_before
    r["load_mismatch"] = [k for k, v in saved.items() if not torch.equal(v, loaded[k])]
    fresh.module.eval()
    with torch.no_grad():
        _, out_loaded, _ = fresh(local)
    r["output_diff"] = max(rel_diff(out_loaded.preds[t], out_saved.preds[t]) for t in TASKS)

    # the reverse conversion gathers every expert on every rank: equal to a module-only load at ep_size 1
    single = ep_engine(cfg, 0, ep_size=1, micro_batch=n, lr=1e-3, wd=0.05, seed=9)
    single.load_checkpoint(str(ckpt), tag="step1", load_module_only=True, load_optimizer_states=False,
                           load_lr_scheduler_states=False)
    back = convert_to_single_process(single.module.model).state_dict()
    gathered = convert_to_single_process(fresh.module.model)
    r["ep1_load_mismatch"] = [k for k, v in gathered.state_dict().items() if not torch.equal(v, back[k])]
    r["gathered_keys"] = len(gathered.state_dict())
    # dropless with unequal token counts per rank (3 images vs 1): capacity is the group maximum
    engine.module.eval()
    gathered.eval()
    uneven = batch["image"][:3] if rank == 0 else batch["image"][3:]
    with torch.no_grad():
        y_ep, y_ref = engine.module.model(uneven), gathered(uneven)
    r["uneven_output_diff"] = max(rel_diff(y_ep.preds[t], y_ref.preds[t]) for t in TASKS)
    # optimizer state came back too: one more step from the saved and the loaded engine agrees
    resumed = ep_engine(cfg, 0, ep_size=world, micro_batch=n, lr=1e-3, wd=0.05, seed=11)
    resumed.load_checkpoint(str(ckpt), tag="step1")
    for e in (engine, resumed):
        e.module.train()
        loss, _, _ = e(local)
        e.backward(loss)
        e.step()
    second = resumed.module.state_dict()
    r["second_step_mismatch"] = [k for k, v in engine.module.state_dict().items() if not torch.equal(v, second[k])]
    r["second_step_moved"] = any(not torch.equal(v, saved[k]) for k, v in second.items())

    return r


def main() -> None:
    out_dir, check = Path(sys.argv[1]), sys.argv[2]
    from modsquad_ds.distributed.bootstrap import init_distributed

    ctx = init_distributed(timeout_s=120, heartbeat_timeout_s=0)
    import deepspeed.utils.logging as ds_logging

    ds_logging.logger.setLevel("WARNING")
    t_init = time.perf_counter() - T0
    record = {}
    for one in check.split("+"):  # several checks share one launch: 8 processes start slowly on 2 cores
        if one == "equivalence":
            # optional: ep_size (default: the world size; comma-separated: several, cases keyed
            # "ep{N}_zero..") and a comma-separated subset of the cases
            sizes = [int(e) for e in sys.argv[3].split(",")] if len(sys.argv) > 3 else [None]
            cases = sys.argv[4] if len(sys.argv) > 4 else None
            for ep in sizes:
                prefix = f"ep{ep}_" if len(sizes) > 1 else ""
                record.update(check_equivalence(ctx.rank, ctx.world_size, ep, cases, prefix))
        elif one == "checkpoint":
            record.update(check_checkpoint(ctx.rank, ctx.world_size, out_dir))
        else:
            raise SystemExit(f"unknown check {one!r}")
    record["startup_s"] = t_init
    record["total_s"] = time.perf_counter() - T0
    (out_dir / f"rank{ctx.rank}.json").write_text(json.dumps(record, indent=1))
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    from modsquad_ds.distributed.bootstrap import end_process

    main()
    end_process(0)  # as the trainer ends (gloo threads vs interpreter teardown)
