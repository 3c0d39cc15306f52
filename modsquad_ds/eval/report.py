"""Writing one evaluation's results: JSON, a Table 1 style markdown, TensorBoard scalars, PNGs.

Files (rank 0 only, each written atomically) in ``{run}/eval/``::

    {split}_step_{N}.json           metrics per task, usage summary, samples, checkpoint
    {split}_step_{N}.md             the metrics as a markdown table like the paper's Table 1
    {split}_step_{N}_usage.png      hard usage frequency per MoE layer (Fig. 5 / 6)
    {split}_step_{N}_similarity.png task similarity per layer and overall (Fig. A2-A4)

and scalars ``eval_{split}/{task}/{metric}`` at step N in ``{run}/tensorboard``. An evaluation of
the split's first M samples only (``evaluate --max-samples M``) says ``{split}_first{M}`` instead of
``{split}`` in each name.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Sequence

from modsquad_ds.data.tasks import get_task
from modsquad_ds.eval import plots
from modsquad_ds.eval.metrics import main_metric

SHORT = {
    "class_object": "ClsO", "class_scene": "ClsS", "principal_curvature": "Curv", "edge_texture": "Edge2D",
    "edge_occlusion": "Edge3D", "keypoints2d": "Key2D", "keypoints3d": "Key3D", "depth_euclidean": "DepE",
    "depth_zbuffer": "DepZ", "normal": "Normal", "reshading": "Reshade", "segment_unsup2d": "Seg2D",
    "segment_unsup25d": "Seg2.5D", "segment_semantic": "SegSem",
}


def _fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"


def table1(rows: Mapping[str, Mapping[str, Mapping[str, float]]], tasks: Sequence[str]) -> str:
    """Markdown: one row per method, one column per task's main metric (arrow: better direction)."""
    head = "| method | " + " | ".join(
        f"{SHORT.get(t, t)} {main_metric(t)} {'↓' if get_task(t).lower_is_better else '↑'}" for t in tasks) + " |"
    lines = [head, "|---|" + "---:|" * len(tasks)]
    for method, metrics in rows.items():
        lines.append(f"| {method} | " + " | ".join(
            _fmt(metrics.get(t, {}).get(main_metric(t), float("nan"))) for t in tasks) + " |")
    return "\n".join(lines)


def depth_table(rows: Mapping[str, Mapping], tasks: Sequence[str]) -> str:
    """The full depth metrics (RMSE, abs, rel, delta) per method and depth task."""
    depth = [t for t in tasks if get_task(t).metric == "rmse"]
    if not depth:
        return ""
    keys = ["rmse", "abs_err", "rel_err", "delta1", "delta2", "delta3"]
    lines = ["| method | task | " + " | ".join(keys) + " |", "|---|---|" + "---:|" * len(keys)]
    for method, metrics in rows.items():
        for t in depth:
            m = metrics.get(t, {})
            lines.append(f"| {method} | {t} | " + " | ".join(_fmt(m.get(k, float("nan"))) for k in keys) + " |")
    return "\n".join(lines)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_results(run_dir: Path, result, step: int, checkpoint: str, task_names: Sequence[str],
                  tensorboard: bool = True) -> Path:
    """Write the files above; returns the JSON's path."""
    out = Path(run_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{result.name}_step_{step:08d}"
    data = {"split": result.split, "first": result.first, "step": step, "checkpoint": checkpoint,
            "samples": result.samples,
            "corrupt": result.corrupt, "tasks": result.metrics, "usage": result.usage,
            "main_metrics": {t: main_metric(t) for t in task_names}}
    path = out / f"{stem}.json"
    _atomic_text(path, json.dumps(data, indent=1))
    part = "" if result.first is None else f"; only the split's first {result.first} samples"
    md = [f"# Evaluation of {run_dir} on {result.split} (step {step}, {result.samples} images{part})", "",
          table1({Path(run_dir).name: result.metrics}, task_names), ""]
    dt = depth_table({Path(run_dir).name: result.metrics}, task_names)
    if dt:
        md += ["Depth, all metrics (metres):", "", dt, ""]
    if result.usage:
        md += [f"Routing: mean MI per layer {result.usage['mean_mi']:.4f} nats, mean sharpness (hard) "
               f"{result.usage['mean_sharpness_hard']:.3f}.", ""]
    _atomic_text(out / f"{stem}.md", "\n".join(md))
    if result.usage:
        plots.usage_maps(out / f"{stem}_usage.png", task_names, result.usage,
                         title=f"expert usage per task, {result.split}, step {step}")
        mats = {name: layer["similarity"] for name, layer in result.usage["layers"].items()}
        mats["mean over layers"] = result.usage["similarity"]
        plots.similarity_map(out / f"{stem}_similarity.png", task_names, mats,
                             title="fraction of experts two tasks share on the same input")
    if tensorboard:
        log_scalars(Path(run_dir) / "tensorboard", result, step,
                    [out / f"{stem}_usage.png", out / f"{stem}_similarity.png"])
    return path


def scalars(result) -> dict[str, float]:
    out = {}
    for task, metrics in result.metrics.items():
        for key, value in metrics.items():
            if key != "count" and not math.isnan(value):
                out[f"eval_{result.name}/{task}/{key}"] = value
    if result.usage:
        out[f"eval_{result.name}/routing/mean_mi"] = result.usage["mean_mi"]
        out[f"eval_{result.name}/routing/mean_sharpness"] = result.usage["mean_sharpness_hard"]
    return out


def log_scalars(tb_dir: Path, result, step: int, images: Sequence[Path] = ()) -> None:
    """Scalars ``eval_{split}/...`` and the heat-map PNGs (as images) at ``step``."""
    from matplotlib.image import imread
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tb_dir)) as tb:
        for key, value in scalars(result).items():
            tb.add_scalar(key, value, step)
        for png in images:
            if Path(png).is_file():
                tb.add_image(f"eval_{result.name}/{Path(png).stem.rsplit('_', 1)[-1]}", imread(png)[..., :3],
                             step, dataformats="HWC")
