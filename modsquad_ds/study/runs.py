"""Train and evaluate the study's runs in this one process (one process group for all of them).

Each run is the trainer's own code path (``Trainer(cfg, ...).run()``, the DeepSpeed engine, the
shard loader the demo uses) followed by the evaluation command's (``evaluate_checkpoint``), so the
study measures exactly what users run. One process group serves every run: starting a fresh Python
and DeepSpeed per run would cost more than training the tiny models.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from modsquad_ds.config import load_config
from modsquad_ds.distributed.ds_config import ds_config_for_run

ROOT = Path(__file__).resolve().parents[2]

METHODS = {
    # name: (baseline YAML, label in tables)
    "stl": ("configs/baselines/stl.yaml", "STL"),
    "mtl": ("configs/baselines/mtl.yaml", "MTL"),
    "normal_moe": ("configs/baselines/normal_moe.yaml", "Normal MoE"),
    "modified_moe": ("configs/baselines/modified_moe.yaml", "modified-MoE"),
    "m3vit": ("configs/baselines/m3vit.yaml", "M3ViT-style"),
    "moe_mlp_only": ("configs/baselines/moe_mlp_only.yaml", "MoE MLP only"),
    "moe_attn_only": ("configs/baselines/moe_attn_only.yaml", "MoE attn only"),
    "modsquad": ("configs/baselines/modsquad.yaml", "Mod-Squad"),
    # fidelity variants (docs/evaluation.md)
    "modsquad_authors": ("configs/baselines/modsquad_authors.yaml", "Mod-Squad, authors' choices"),
    "modsquad_topk_mi": ("configs/baselines/modsquad_topk_mi.yaml", "Mod-Squad, MI over top-k gates"),
}


@dataclass
class RunSpec:
    method: str
    seed: int
    out_dir: Path
    overrides: list[str]


def run_config(spec: RunSpec, base_config: str):
    files = [str(ROOT / base_config), str(ROOT / METHODS[spec.method][0])]
    return load_config(files, [*spec.overrides, f"seed={spec.seed}", f"train.out_dir={spec.out_dir}"])


def _settings_changed(saved: Path, cfg) -> bool:
    """True if ``saved`` (an earlier run's config.yaml) differs from ``cfg`` in anything but resume."""
    if not saved.is_file():
        return False
    from modsquad_ds.config.loader import to_dict

    def comparable(c):
        return to_dict(dataclasses.replace(c, train=dataclasses.replace(c.train, resume=True)))

    return comparable(load_config([str(saved)])) != comparable(cfg)


def train_and_evaluate(spec: RunSpec, base_config: str, split: str, progress: bool = False) -> dict:
    """Train and evaluate; returns the evaluation JSON, or the existing one of a finished run.
    The seconds it took go into ``{run}/study_seconds.json`` (the report sums them). ``progress``:
    the training and evaluation progress bars."""
    import time

    started = time.perf_counter()
    from modsquad_ds.eval.__main__ import evaluate_checkpoint
    from modsquad_ds.train.checkpoint import find_checkpoint, step_of
    from modsquad_ds.eval.report import write_results
    from modsquad_ds.train.trainer import Trainer

    cfg = run_config(spec, base_config)
    if _settings_changed(spec.out_dir / "config.yaml", cfg):
        # another budget (--steps) or setting: continuing would splice two learning-rate schedules
        # into one run, and its evaluation is not this one's; start over (train/start_over.py moves
        # the earlier run aside, its evaluation with it)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=False))
    ds_config = ds_config_for_run(cfg)
    folder = spec.out_dir / "eval"
    done = sorted(folder.glob(f"{split}_step_{cfg.train.steps:08d}.json")) if folder.is_dir() else []
    if done and cfg.train.resume:
        return json.loads(done[-1].read_text())
    Trainer(cfg, ds_config, 0, 1, progress=progress).run()
    ckpt = find_checkpoint(spec.out_dir)
    result = evaluate_checkpoint(cfg, ds_config, ckpt, split, 0, 1, progress=progress)
    path = write_results(spec.out_dir, result, step_of(ckpt), str(ckpt), cfg.tasks.names)
    (spec.out_dir / "study_seconds.json").write_text(json.dumps(time.perf_counter() - started))
    return json.loads(path.read_text())
