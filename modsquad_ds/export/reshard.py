"""Reshard a training checkpoint to another world size and ep_size, so a run resumes on another
number of GPUs.

DeepSpeed's optimizer files are tied to the layout that wrote them (ZeRO partitions per rank, expert
shards per expert-parallel rank), and its own converters skip native MoE experts. So the resharded
checkpoint is layout-free: every parameter's fp32 master and Adam moments as whole tensors in the
single-process naming (one safetensors file), plus the scalars a resume needs. The trainer's resume
(:func:`modsquad_ds.train.checkpoint.load_latest`) recognises such a folder and each rank of the new
layout copies its own slices in (:func:`load_into_engine`): its ZeRO partition of every group
through DeepSpeed's own fragment addresses (``param._hp_mapping``), its experts by global id. The
next save writes a normal DeepSpeed checkpoint of the new layout.

What carries over exactly: weights (fp32 masters), Adam's exp_avg / exp_avg_sq / step, the learning-rate
schedule, the step count, the expert-usage sums. What cannot: the data order (the shards split by
rank, so another world size reads other samples; the epoch position is converted by samples
consumed) and the per-rank RNG streams (restarted from the seed, as on any resume with more ranks).
The global batch stays the same by default (data.batch_size is scaled by old / new world size).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch

from modsquad_ds.config.loader import load_config, save_config
from modsquad_ds.export.reader import (CheckpointError, MODEL_STATES, _global_expert_name, _load, _zero_files,
                                       _LOCAL_EXPERT, load_checkpoint_weights)
from modsquad_ds.moe.ds_adapter import expert_parallel_layers, reference_key
from modsquad_ds.train import manifest
from modsquad_ds.train.checkpoint import RESHARDED, RESHARDED_STATE, TrainPosition, is_resharded, run_layout, tag_for

MOMENTS = ("exp_avg", "exp_avg_sq")
COMMAND = "python -m modsquad_ds.reshard"


def _full_name(engine_name: str) -> str:
    """Engine key (``model.`` / ``objective.`` + DeepSpeed MoE naming, global expert ids) -> the
    single-process key with the same prefix."""
    if engine_name.startswith("model."):
        return "model." + reference_key(engine_name[len("model."):])
    return engine_name


def _zero_moments(folder: Path, world: int, ep_size: int, local_experts: int) -> tuple[dict, int]:
    """Adam moments by single-process name from ZeRO 1/2 partitions (same assembly as the masters)."""
    files = _zero_files(folder)
    frags: dict[str, dict[str, list]] = {k: defaultdict(list) for k in MOMENTS}
    step = 0
    for rank in range(world):
        if rank not in files:
            raise CheckpointError(f"{folder}: missing the optimizer partition of rank {rank} "
                                  f"(zero_pp_rank_{rank}_..._optim_states.pt; the run had {world} ranks)")
        sd = _load(files[rank])["optimizer_state_dict"]
        state = sd["base_optimizer_state"]["state"]
        for i, (mapping, group) in enumerate(zip(sd["param_slice_mappings"], sd["base_optimizer_state"]["param_groups"])):
            if i not in state:
                continue  # no step taken yet: Adam's state is created lazily
            step = int(state[i]["step"])
            for name, address in mapping.items():
                if group.get("moe"):
                    name = _global_expert_name(name, (rank % ep_size) * local_experts)
                for key in MOMENTS:
                    frags[key][_full_name(name)].append(state[i][key].narrow(0, address.start, address.numel))
    return {k: {n: torch.cat(p).float() for n, p in v.items()} for k, v in frags.items()}, step


def _zero0_moments(folder: Path, cfg) -> tuple[dict, int]:
    """Adam moments by single-process name from ZeRO 0 optimizer files (export/zero0.py)."""
    from modsquad_ds.export import zero0

    moments: dict[str, dict] = {k: {} for k in MOMENTS}
    step = 0
    for saved in zero0.read(folder, cfg):
        index = [i for g in saved.torch_state["param_groups"] for i in g["params"]]
        for i, name in zip(index, saved.names):
            state = saved.torch_state["state"].get(i)
            if state is None:
                continue
            step = int(state["step"])
            for key in MOMENTS:
                moments[key][_full_name(name)] = state[key].float()
    return moments, step


def _batch_for(old_batch: int, old_world: int, new_world: int) -> int:
    global_batch = old_batch * old_world
    if global_batch % new_world:
        raise CheckpointError(f"the global batch {global_batch} ({old_batch} x {old_world} ranks) does not "
                              f"split over {new_world} ranks: pass --set data.batch_size=N")
    return global_batch // new_world


def reshard(run: Path, out: Path, world_size: int, ep_size: Optional[int] = None, step: Optional[int] = None,
            overrides: tuple[str, ...] = ()) -> Path:
    """Write ``out`` as a run folder whose newest checkpoint resumes ``run`` on ``world_size`` ranks
    with ``ep_size`` (default: unchanged). Returns the checkpoint folder."""
    from modsquad_ds.distributed.ds_config import ds_config_for_run
    from modsquad_ds.distributed.parallel import ParallelDims

    run, out = Path(run), Path(out)
    if out.resolve() == run.resolve():
        raise CheckpointError(f"--out must differ from --run ({run})")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        # another run's checkpoints would mix with this one's (a live run's even), its config be replaced
        raise CheckpointError(f"--out {out} exists and is not empty: reshard into a new folder")
    weights = load_checkpoint_weights(run, step, require_master=True)
    if is_resharded(weights.folder):  # its optimizer state is not in DeepSpeed's files
        raise CheckpointError(f"{weights.folder} was itself written by {COMMAND}: reshard the run it came "
                              f"from, or resume it first")
    cfg = weights.config
    states = _load(weights.folder / MODEL_STATES)
    old_world = weights.world_size
    num_experts = list(states.get("num_experts") or [])
    local = num_experts[0] // cfg.train.ep_size if num_experts else 1
    if weights.zero_stage > 0:
        moments, adam_step = _zero_moments(weights.folder, old_world, cfg.train.ep_size, local)
    else:
        moments, adam_step = _zero0_moments(weights.folder, cfg)

    saved_layout = json.loads((weights.folder / "layout.json").read_text()) \
        if (weights.folder / "layout.json").is_file() else {}
    old_batch = int(saved_layout.get("data.batch_size", cfg.data.batch_size))  # config.yaml may be a later launch's
    extra = [f"train.ep_size={ep_size or cfg.train.ep_size}", f"train.out_dir={out}"]
    if not any(o.split("=", 1)[0].strip() == "data.batch_size" for o in overrides):
        extra.append(f"data.batch_size={_batch_for(old_batch, old_world, world_size)}")
    extra += list(overrides)
    new_cfg = load_config([run / "config.yaml"], extra)
    ParallelDims.from_config(new_cfg, world_size, ds_config_for_run(new_cfg))  # ConfigError on a bad layout

    old_pos = TrainPosition(**states.get("position", {}))
    consumed = old_pos.batch_in_epoch * old_batch * old_world
    position = TrainPosition(step=old_pos.step, epoch=old_pos.epoch,
                             batch_in_epoch=consumed // (new_cfg.data.batch_size * world_size))

    tensors = {}
    for key, value in weights.model.items():
        tensors[f"model.{key}"] = value
    for key, value in weights.objective.items():
        tensors[f"objective.{key}"] = value
    for kind, table in moments.items():
        for name, value in table.items():
            if name not in tensors:
                raise CheckpointError(f"{weights.folder}: optimizer state for {name}, which no weight file has")
            tensors[f"{kind}/{name}"] = value.view(tensors[name].shape)

    usage_json = run / "usage.json"
    meta = {"format": "modsquad_resharded/1", "source": str(weights.folder), "weights": weights.source,
            "from_layout": {"world_size": old_world, "train.ep_size": cfg.train.ep_size,
                            "zero_stage": weights.zero_stage},
            "position": dataclasses.asdict(position), "adam_step": adam_step,
            "lr_scheduler": states.get("lr_scheduler"), "global_steps": states.get("global_steps", position.step),
            "global_samples": states.get("global_samples", 0), "skipped_steps": states.get("skipped_steps", 0)}

    out.mkdir(parents=True, exist_ok=True)
    root = out / "checkpoints"
    root.mkdir(exist_ok=True)
    partial = root / f".partial-{tag_for(position.step)}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial / RESHARDED_STATE))
    (partial / RESHARDED).write_text(json.dumps(meta, indent=1))
    # no ZeRO stage or precision: a resharded checkpoint loads into any engine (load_into_engine)
    layout = run_layout(new_cfg, world_size)
    (partial / "layout.json").write_text(json.dumps({**layout, **dataclasses.asdict(position)}, indent=1))
    manifest.write(partial, manifest.build(partial, collective=False))  # last: resume verifies it
    final = root / tag_for(position.step)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    (root / ".latest.tmp").write_text(final.name)
    os.replace(root / ".latest.tmp", root / "latest")
    save_config(new_cfg, out / "config.yaml")
    if usage_json.is_file():
        shutil.copyfile(usage_json, out / "usage.json")
    return final


@torch.no_grad()
def load_into_engine(engine, folder: Path, rank: int) -> tuple[TrainPosition, dict]:
    """Each rank copies its share of a resharded checkpoint into its engine (no collectives): every
    parameter's fp32 master and Adam moments into this rank's ZeRO fragments (or the plain optimizer
    state at ZeRO 0), the schedule and counters into the engine. Returns (position, client extras)."""
    from safetensors.torch import load_file

    meta = json.loads((Path(folder) / RESHARDED).read_text())
    state = load_file(str(Path(folder) / RESHARDED_STATE))
    global_ids = {path: layer.global_expert_ids() for path, layer in expert_parallel_layers(engine.module)}
    optimizer = engine.optimizer
    # ZeRO 1/2 optimizer's flat fp32 partitions; DeepSpeed's BF16_Optimizer names them otherwise
    flat_groups = getattr(optimizer, "single_partition_of_fp32_groups", None) or \
        getattr(optimizer, "fp32_groups_flat_partition", None)
    # bf16 at ZeRO 0 (FP16_UnfusedOptimizer): a whole fp32 master per module parameter, which the
    # wrapped torch optimizer steps and DeepSpeed copies into the module after every step
    masters = {id(lp): hp for lps, hps in zip(getattr(optimizer, "fp16_groups", None) or (),
                                              getattr(optimizer, "fp32_groups", None) or ())
               for lp, hp in zip(lps, hps)} if flat_groups is None else {}
    zero_state = {}
    for name, p in engine.module.named_parameters():
        key = name
        m = _LOCAL_EXPERT.search(name)
        if m:
            path = name[: m.start()]
            key = _LOCAL_EXPERT.sub(lambda mm: f"{mm.group(1)}{global_ids[path][int(mm.group(2))]}.", name, count=1)
        key = _full_name(key)
        if key not in state:
            raise CheckpointError(f"{folder}: no value for {key} (resharded from another model?)")
        value = state[key]
        p.data.copy_(value.view_as(p).to(p.dtype))
        mapping = getattr(p, "_hp_mapping", None)
        if hasattr(p, "_hp_mapping"):  # ZeRO 1/2 (and bf16): this rank's fragment of the flat fp32 partition
            if mapping is None:
                continue  # no fragment of this parameter lives on this rank
            flat = value.reshape(-1)
            lp = mapping.lp_fragment_address
            mapping.hp_fragment.data.copy_(flat.narrow(0, lp.start, lp.numel))
            group = flat_groups[mapping.param_group_index]
            slot = zero_state.setdefault(mapping.param_group_index, {k: torch.zeros_like(group) for k in MOMENTS})
            for kind in MOMENTS:
                if f"{kind}/{key}" in state:
                    hp = mapping.hp_fragment_address
                    slot[kind].narrow(0, hp.start, hp.numel).copy_(
                        state[f"{kind}/{key}"].reshape(-1).narrow(0, lp.start, lp.numel))
        else:  # ZeRO 0: the torch optimizer holds whole parameters (bf16: their fp32 masters)
            target = masters.get(id(p), p)
            if target is not p:
                target.data.copy_(value.view_as(target))
            if f"exp_avg/{key}" in state:  # (FP16_UnfusedOptimizer.state is its torch optimizer's)
                optimizer.state[target] = {"step": torch.tensor(float(meta["adam_step"])),
                                           **{k: state[f"{k}/{key}"].view_as(target).clone().to(target.device)
                                              for k in MOMENTS}}
    if zero_state:
        for index, moments in zero_state.items():
            flat = flat_groups[index]
            optimizer.optimizer.state[flat] = {"step": torch.tensor(float(meta["adam_step"])), **moments}
    if engine.lr_scheduler is not None and meta.get("lr_scheduler"):
        engine.lr_scheduler.load_state_dict(meta["lr_scheduler"])
    engine.global_steps = meta["global_steps"]
    engine.global_samples = meta["global_samples"]
    engine.skipped_steps = meta["skipped_steps"]
    extra = {}
    usage_path = Path(folder).parents[1] / "usage.json"
    if rank == 0 and usage_path.is_file():  # the sums over all old ranks go to one new rank
        extra["usage"] = usage_tables(usage_path)
    return TrainPosition(**meta["position"]), extra


def usage_tables(path: Path) -> dict:
    data = json.loads(Path(path).read_text())
    return {layer["layer"]: {"kind": layer["kind"], "top_k": layer["top_k"],
                             "counts": torch.tensor(layer["counts"], dtype=torch.float64),
                             "tokens": torch.tensor(layer["tokens"], dtype=torch.float64)}
            for layer in data["layers"]}
