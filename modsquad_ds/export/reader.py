"""Read a training checkpoint into one plain fp32 state dict, on CPU, without any process group.

A checkpoint folder (``{run}/checkpoints/step_N``, see :mod:`modsquad_ds.train.checkpoint`) holds
DeepSpeed's files, whatever world size, ``ep_size`` and ZeRO stage wrote it:

- ``mp_rank_00_model_states.pt``: the dense weights and routers of the engine's module
  (``model.*`` and ``objective.*``), in the run's precision, with DeepSpeed's metadata
  (``dp_world_size``, ``num_experts`` per MoE layer, ``ds_config``) and our client state
  (``position``, ``usage`` tables).
- ``layer_{L}_expert_{E}_mp_rank_00_model_states.pt``: the weights of MoE MLP layer L's expert E,
  keyed by *global* expert id (L counts MoE MLP layers in module order); every rank wrote the
  experts it owned, so the folder holds all of them whatever ``ep_size`` was.
- ZeRO 1/2: ``[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt``, one per rank, each holding
  that rank's slice of every optimizer parameter group as one flat fp32 tensor
  (``single_partition_of_fp32_groups``) and, per group, where each parameter's fragment lies in
  that slice (``param_slice_mappings``: name -> (start, numel)); DeepSpeed's
  ``runtime/zero/stage_1_and_2.py``, ``state_dict``. Dense groups are split over all ranks,
  expert groups over the expert-data-parallel group (ranks with the same ``rank % ep_size``,
  ordered by ``rank // ep_size``: DeepSpeed's default groups, ``utils/groups.py``), and name the
  experts by their *local* id on the rank's expert-parallel rank ``rank % ep_size``.
- ZeRO 0: each expert-parallel rank's whole optimizer state (``expp_rank_*_optim_states.pt``),
  parameters by index; a bf16 run's holds the fp32 masters too (:mod:`modsquad_ds.export.zero0`).

Precision: a bf16 run's module weights are bf16; its fp32 master weights live only in the optimizer
files. The reader takes every parameter from them when they are there (and checks that each master
rounds to the saved bf16 weight, which proves the fragments were put together right); a frozen
weight (fine-tuning) has no master and is the bf16 module weight, as the run used it. Without
optimizer files it upcasts the module weights and says so in ``source`` (with a warning; pass
``require_master=True`` to refuse instead). fp32 runs: the module weights *are* the masters.

DeepSpeed's ``zero_to_fp32.py`` fails on MoE folders and ``ds_to_universal`` skips native MoE
experts, hence this reader. Files are read with ``torch.load(weights_only=True)``; the optimizer
files pickle three small DeepSpeed objects (``fragment_address``, ``LossScaler``,
``ZeroStageEnum``), which are allowed as inert stand-ins (no DeepSpeed import, no code run).
Unknown files in the folder (manifests, DeepSpeed's scripts) are ignored.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from modsquad_ds.config.loader import load_config
from modsquad_ds.config.schema import ConfigError, RunConfig
from modsquad_ds.moe.ds_adapter import expert_checkpoint_name, reference_key
from modsquad_ds.train import manifest
from modsquad_ds.train.checkpoint import RESHARDED, RESHARDED_STATE, CheckpointError, find_checkpoint, is_resharded

__all__ = ["CheckpointError", "CheckpointWeights", "load_checkpoint_weights", "find_checkpoint",
           "MODEL_STATES", "SOURCE_MASTER", "SOURCE_MODULE", "SOURCE_UPCAST"]

MODEL_STATES = "mp_rank_00_model_states.pt"
SOURCE_MASTER = "fp32 master weights from the optimizer files"
SOURCE_MODULE = "module weights (fp32 run: the master weights)"
SOURCE_UPCAST = "bf16 module weights upcast to fp32 (no fp32 master weights in the folder)"

_ZERO_FILE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
_LOCAL_EXPERT = re.compile(r"(\.deepspeed_moe\.experts\.deepspeed_experts\.)(\d+)\.")


def _global_expert_name(name: str, first: int) -> str:
    """An engine parameter name with its local expert id ``i`` replaced by ``first + i`` (``first``:
    the global id of the rank's first expert in that layer); other names unchanged."""
    return _LOCAL_EXPERT.sub(lambda m: f"{m.group(1)}{first + int(m.group(2))}.", name, count=1)


@dataclass
class CheckpointWeights:
    model: dict[str, torch.Tensor]
    """``ModSquadViT`` state dict in the single-process ``MoEMlp`` naming
    (``blocks.{i}.mlp.experts.experts.{E}.fc1.weight``, ``blocks.{i}.mlp.router.task_wg``), fp32."""
    objective: dict[str, torch.Tensor]
    """``MultiTaskObjective`` state (``weighting.log_vars``), fp32."""
    config: RunConfig
    """The run's resolved config (``run_dir/config.yaml``)."""
    step: int
    source: str
    """Where the values came from: :data:`SOURCE_MASTER`, :data:`SOURCE_MODULE` or :data:`SOURCE_UPCAST`
    (with a note when some tensors, e.g. frozen ones, came from the module weights)."""
    folder: Path = Path()
    usage: dict = field(default_factory=dict)
    """Expert-usage tables saved with the checkpoint (``UsageAccumulator.state_dict()``: per layer
    ``kind``, ``top_k``, ``counts`` [T, E] and ``tokens`` [T]); {} if absent. The sums over all ranks
    (the trainer reduces them before saving; checkpoints written before that fix held rank 0's share)."""
    world_size: int = 1
    zero_stage: int = 0
    precision: str = "fp32"


# Inert stand-ins for the DeepSpeed objects pickled in ZeRO optimizer files: weights_only=True
# rebuilds them as plain attribute holders (DeepSpeed is neither imported nor run).
class _FragmentAddress:
    start: int
    numel: int


class _LossScaler:
    pass


def _zero_stage(value) -> int:
    return int(value)


_DS_GLOBALS = [(_FragmentAddress, "deepspeed.utils.tensor_fragment.fragment_address"),
               (_LossScaler, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
               (_zero_stage, "deepspeed.runtime.zero.config.ZeroStageEnum")]


def _load(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: missing {path.name}")
    try:
        with torch.serialization.safe_globals(_DS_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle, a class weights_only refuses: all one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__}: {first[:200]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a DeepSpeed checkpoint file (holds a {type(obj).__name__})")
    return obj


def _run_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: missing config.yaml (not a modsquad_ds run folder)")
    try:
        return load_config([path])
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from None


def _saved_ep_size(folder: Path, cfg: RunConfig) -> int:
    """The ep_size the checkpoint was written with: its layout.json (checkpoint.save), else config.yaml.
    config.yaml is the *last launch's* settings, which a launch refused for a layout mismatch has
    already overwritten (the trainer writes it before it reads the checkpoint)."""
    path = folder / "layout.json"
    if path.is_file():
        try:
            return int(json.loads(path.read_text()).get("train.ep_size", cfg.train.ep_size))
        except (ValueError, TypeError) as err:
            raise CheckpointError(f"{path}: unreadable ({err})") from None
    return cfg.train.ep_size


def _experts(folder: Path, num_experts: list[int]) -> dict[str, torch.Tensor]:
    """Every expert of every MoE MLP layer, by global id, in the engine's key naming."""
    out: dict[str, torch.Tensor] = {}
    for layer, count in enumerate(num_experts):
        for expert in range(count):
            state = _load(folder / expert_checkpoint_name(layer, expert))
            if not state or not all(torch.is_tensor(v) for v in state.values()):
                raise CheckpointError(f"{folder / expert_checkpoint_name(layer, expert)}: holds no expert weights")
            out.update(state)
    return out


def _zero_files(folder: Path) -> dict[int, Path]:
    files = {}
    for p in folder.iterdir():
        m = _ZERO_FILE.match(p.name)
        if m:
            files[int(m.group(2))] = p
    return files


def _master_weights(folder: Path, world: int, ep_size: int, local_experts: int) -> dict[str, torch.Tensor]:
    """Flat fp32 master tensors by the engine's parameter name (global expert ids), put together
    from every rank's ZeRO 1/2 partitions; {} when the folder has none."""
    files = _zero_files(folder)
    if not files:
        return {}
    missing = [r for r in range(world) if r not in files]
    if missing:
        raise CheckpointError(f"{folder}: missing the optimizer partition of rank {missing[0]} "
                              f"(zero_pp_rank_{missing[0]}_..._optim_states.pt; the run had {world} ranks)")
    fragments: dict[str, list[torch.Tensor]] = defaultdict(list)
    for rank in range(world):  # rank order = partition order in both the dense and the expert groups
        path = files[rank]
        sd = _load(path).get("optimizer_state_dict")
        try:
            parts, mappings = sd["single_partition_of_fp32_groups"], sd["param_slice_mappings"]
            groups = sd["base_optimizer_state"]["param_groups"]
        except (TypeError, KeyError) as err:
            raise CheckpointError(f"{path}: not a ZeRO 1/2 optimizer partition (no {err})") from None
        for flat, mapping, group in zip(parts, mappings, groups):
            for name, address in mapping.items():
                if group.get("moe"):  # local expert id on this rank's expert-parallel rank -> global
                    name = _global_expert_name(name, (rank % ep_size) * local_experts)
                fragments[name].append(flat.detach().narrow(0, address.start, address.numel))
    return {name: torch.cat(parts).float() for name, parts in fragments.items()}


def load_checkpoint_weights(run_dir: Path, step: Optional[int] = None, require_master: bool = False) -> CheckpointWeights:
    """Read a run's checkpoint (``step`` None: the latest) into fp32 state dicts; see the module doc.

    Raises :class:`CheckpointError` (one line naming the missing or bad piece) for a foreign, partial or
    corrupt folder, and when ``require_master`` is set but a bf16 run's master weights are absent.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run folder")
    cfg = _run_config(run_dir)
    folder = find_checkpoint(run_dir, step)
    if (folder / manifest.NAME).is_file():  # every save writes one; folders from before manifests have none
        problem = manifest.verify(folder, collective=False)
        if problem:  # a flipped byte in a tensor loads without an error, and would be exported as is
            raise CheckpointError(f"checkpoint {folder} is damaged: {problem}")
    if is_resharded(folder):
        return _resharded_weights(folder, cfg)
    states = _load(folder / MODEL_STATES)
    module = states.get("module")
    if not isinstance(module, dict) or not module:
        raise CheckpointError(f"{folder / MODEL_STATES}: no module weights (not a DeepSpeed model-states file)")
    num_experts = list(states.get("num_experts") or [])
    world = int(states.get("dp_world_size") or 1)
    ds_config = states.get("ds_config") or {}
    zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    ep_size = _saved_ep_size(folder, cfg)
    if any(n % ep_size for n in num_experts) or world % ep_size:
        raise CheckpointError(f"{folder}: train.ep_size {ep_size} does not fit the checkpoint "
                              f"({world} ranks, experts per layer {num_experts})")
    if ep_size != cfg.train.ep_size:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, ep_size=ep_size))
    weights = {**module, **_experts(folder, num_experts)}
    low_precision = any(v.is_floating_point() and v.dtype != torch.float32 for v in weights.values())
    precision = "bf16" if low_precision else "fp32"

    source = SOURCE_MODULE
    if low_precision:
        master = _master_weights(folder, world, ep_size, num_experts[0] // ep_size if num_experts else 1)
        if not master and zero_stage == 0:
            from modsquad_ds.export import zero0

            master = zero0.masters(folder, cfg)
        if master:
            weights, from_module = _take_master(weights, master, folder)
            source = SOURCE_MASTER + (f" ({len(from_module)} tensors not in the optimizer, e.g. frozen, "
                                      f"from the module weights)" if from_module else "")
        elif require_master:
            raise CheckpointError(f"{folder}: a {precision} run without its optimizer files "
                                  f"(*optim_states.pt): its fp32 master weights are not in the folder")
        else:
            source = SOURCE_UPCAST
            warnings.warn(f"{folder}: {SOURCE_UPCAST}", stacklevel=2)

    model, objective = {}, {}
    for key, value in weights.items():
        value = value.detach().float() if value.is_floating_point() else value.detach()
        if key.startswith("model."):
            model[reference_key(key[len("model."):])] = value
        elif key.startswith("objective."):
            objective[key[len("objective."):]] = value
        else:
            raise CheckpointError(f"{folder}: unexpected weight {key!r} (not a modsquad_ds training checkpoint)")
    _check_against_config(model, cfg, folder)
    position = states.get("position") or {}
    return CheckpointWeights(model=model, objective=objective, config=cfg,
                             step=int(position.get("step", states.get("global_steps", 0))), source=source,
                             folder=folder, usage=dict(states.get("usage") or {}), world_size=world,
                             zero_stage=zero_stage, precision=precision)


def _resharded_weights(folder: Path, cfg: RunConfig) -> CheckpointWeights:
    """A checkpoint ``python -m modsquad_ds.reshard`` wrote, not yet resumed: every weight in one
    safetensors file, in this reader's naming, fp32 (what the source checkpoint gave the reader)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        meta = json.loads((folder / RESHARDED).read_text())
        state = load_file(str(folder / RESHARDED_STATE))
        layout = json.loads((folder / "layout.json").read_text())
    except (OSError, ValueError, SafetensorError) as err:
        raise CheckpointError(f"{folder}: unreadable resharded checkpoint ({type(err).__name__}: {err})") from None
    model = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    objective = {k[len("objective."):]: v for k, v in state.items() if k.startswith("objective.")}
    _check_against_config(model, cfg, folder)
    return CheckpointWeights(model=model, objective=objective, config=cfg, step=int(meta["position"]["step"]),
                             source=f"{meta['weights']} of {meta['source']}, resharded", folder=folder,
                             world_size=int(layout["world_size"]))


def _take_master(weights: dict[str, torch.Tensor], master: dict[str, torch.Tensor],
                 folder: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    out, from_module = {}, []
    for name, saved in weights.items():
        flat = master.get(name)
        if flat is None:
            out[name] = saved
            if saved.is_floating_point():
                from_module.append(name)
            continue
        if flat.numel() != saved.numel():
            raise CheckpointError(f"{folder}: the optimizer files hold {flat.numel()} values for {name}, "
                                  f"the module weight has {saved.numel()}")
        value = flat.view(saved.shape)
        # DeepSpeed copies the rounded masters into the module after every step: equality proves
        # the fragments were gathered from the right ranks, in the right order.
        if not torch.equal(value.to(saved.dtype), saved):
            raise CheckpointError(f"{folder}: the fp32 master of {name} from the optimizer files does not "
                                  f"round to its saved {saved.dtype} weight (optimizer files from another run or layout?)")
        out[name] = value
    unknown = sorted(set(master) - set(weights))
    if unknown:
        raise CheckpointError(f"{folder}: the optimizer files hold {unknown[0]!r}, which no weight file has")
    return out, from_module


def _check_against_config(model: dict[str, torch.Tensor], cfg: RunConfig, folder: Path) -> None:
    """The weights must be exactly those of the model config.yaml describes."""
    from modsquad_ds.model.vit import ModSquadViT

    # built on the CPU (the constructor reads values: torch.linspace(...).tolist() fails on "meta")
    expected = ModSquadViT(cfg.model, cfg.moe, cfg.tasks.names).state_dict()
    missing = [k for k in expected if k not in model]
    if missing:
        raise CheckpointError(f"{folder}: no weight for {missing[0]} (and {len(missing) - 1} more) of the model "
                              f"in config.yaml" if len(missing) > 1 else f"{folder}: no weight for {missing[0]}")
    extra = [k for k in model if k not in expected]
    if extra:
        raise CheckpointError(f"{folder}: weight {extra[0]} is not in the model config.yaml describes")
    for k, v in expected.items():
        if tuple(model[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{folder}: {k} has shape {tuple(model[k].shape)}, config.yaml's model "
                                  f"needs {tuple(v.shape)}")
