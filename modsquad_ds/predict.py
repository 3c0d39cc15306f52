"""Run exported models on image files and write predictions in the Taskonomy release's encodings.

    python -m modsquad_ds.predict --model runs/demo/export/step_00000300/depth_zbuffer.safetensors --images photos/
    python -m modsquad_ds.predict --model runs/demo/export/step_00000300 --images a.jpg b.png --device cuda
    python -m modsquad_ds.predict --model runs/demo --images photos/          (a run folder: every task)

--model is one exported task model (.safetensors), a whole-model export (whole.safetensors), a folder
of task exports (every task in it), or a run folder (its latest checkpoint, every task; no DeepSpeed
processes). Images are resized to the model's input size as in training (ImageNet normalisation),
run in batches, and each prediction is resized back to the image's size and written to
--out/{task}/{image}.png (same-named images of several folders: {folder}__{image}.png) in the
release encoding of the task (16-bit depth in 1/512 m, 8-bit normals centred on 128, 16-bit edges
and keypoints, ...) with a viewable {image}_color.png beside it; classification tasks write
{image}.json with the class scores (release class indices). Unreadable images are skipped and listed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError

from modsquad_ds.config.schema import ConfigError
from modsquad_ds.data import decode
from modsquad_ds.data.classes import default_keep
from modsquad_ds.data.encode import colorize, encode_pixel, png_bytes
from modsquad_ds.data.tasks import get_task
from modsquad_ds.data.transforms import resize_image
from modsquad_ds.progress import track

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
Predictor = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def image_files(items: list[Path]) -> list[Path]:
    files = []
    for item in items:
        if item.is_dir():
            files += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            files.append(item)
        else:
            raise ConfigError("--images", f"not found: {item}")
    if not files:
        raise ConfigError("--images", "no image files (" + ", ".join(sorted(IMAGE_SUFFIXES)) + ")")
    return files


def output_names(files: list[Path]) -> list[str]:
    """Each image's output name: its stem, or, where stems repeat (Taskonomy's view names recur in
    every building's folder), its path below the inputs' common folder joined with ``__``."""
    stems = [f.stem for f in files]
    if len(set(stems)) == len(stems):
        return stems
    common = Path(os.path.commonpath([str(f.resolve().parent) for f in files]))
    names = ["__".join(f.resolve().relative_to(common).with_suffix("").parts) for f in files]
    if len(set(names)) < len(names):  # the same file given twice, or a.png and a.jpg side by side
        twice = sorted({str(f) for f, n in zip(files, names) if names.count(n) > 1})
        raise ConfigError("--images", f"{len(twice)} images would write the same output: {', '.join(twice[:3])}")
    return names


def _read_model(model: Path, load: Callable):
    """``load(model)``, a file that is not an export in one line (safetensors says "header too large")."""
    try:
        return load(model)
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        raise ConfigError("--model", f"{model}: not an exported model ({_first_line(err)})") from None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_predictor(model: Path, device: torch.device, tasks: list[str] | None, step: int | None
                   ) -> tuple[Predictor, list[str], int, dict[str, tuple]]:
    """(images -> {task: prediction}, task names, input size, class indices per class task)."""
    from modsquad_ds.export.files import is_whole_model, load_task_model, load_whole_model

    if model.is_file():
        if _read_model(model, is_whole_model):
            full, cfg = _read_model(model, lambda m: load_whole_model(m, str(device)))
            return _full_predictor(full, cfg, tasks)
        models = [_read_model(model, lambda m: load_task_model(m, str(device)))]
    elif (model / "checkpoints").is_dir():
        from modsquad_ds.export.pipeline import full_model
        from modsquad_ds.export.reader import load_checkpoint_weights

        weights = load_checkpoint_weights(model, step)
        return _full_predictor(full_model(weights).to(device), weights.config, tasks)
    else:
        found = sorted(model.glob("*.safetensors")) if model.is_dir() else []
        wholes = [p for p in found if _read_model(p, is_whole_model)]
        files = [p for p in found if p not in wholes]
        if not files and len(wholes) == 1:  # the folder of export --whole
            return load_predictor(wholes[0], device, tasks, step)
        models = [_read_model(p, lambda m: load_task_model(m, str(device))) for p in files]
    if not models:
        raise ConfigError("--model", f"{model}: no exported model (a .safetensors file, an export folder or a run folder)")
    if tasks is not None:
        unknown = sorted(set(tasks) - {m.task for m in models})
        if unknown:
            raise ConfigError("--tasks", f"{model} has no model for {', '.join(unknown)} "
                                         f"(it has {', '.join(m.task for m in models)})")
        models = [m for m in models if m.task in tasks]
    sizes = {m.config["img_size"] for m in models}
    if len(sizes) > 1:
        raise ConfigError("--model", f"{model}: task models with different input sizes {sorted(sizes)}")
    keep = {m.task: tuple(m.config["classes"]) for m in models if "classes" in m.config}
    return (lambda x: {m.task: m(x) for m in models}), [m.task for m in models], sizes.pop(), keep


def _full_predictor(full, cfg, tasks):
    unknown = sorted(set(tasks or []) - set(cfg.tasks.names))
    if unknown:
        raise ConfigError("--tasks", f"the model has no task {', '.join(unknown)} (it has {', '.join(cfg.tasks.names)})")
    names = [t for t in cfg.tasks.names if tasks is None or t in tasks]
    keep = {t: tuple(getattr(cfg.data, f"{t}_keep", None) or default_keep(t)) for t in names
            if get_task(t).kind == "class"}
    return (lambda x: full(x, names).preds), names, cfg.model.img_size, keep


def load_image(path: Path, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """The model's input and the image's (height, width); OSError for a file PIL cannot read."""
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    x = torch.from_numpy(decode.image_to_float(rgb))
    return resize_image(x, size), rgb.shape[:2]


def write_prediction(out: Path, task: str, stem: str, pred: torch.Tensor, size_hw: tuple[int, int],
                     keep: tuple | None) -> list[Path]:
    spec = get_task(task)
    folder = out / task
    folder.mkdir(parents=True, exist_ok=True)
    if spec.kind == "class":
        probs = pred.float().softmax(-1).tolist()
        classes = list(keep) if keep else list(range(len(probs)))
        top = sorted(range(len(probs)), key=lambda i: -probs[i])[:5]
        path = folder / f"{stem}.json"
        path.write_text(json.dumps({"task": task, "classes": classes, "probs": probs,
                                    "top5": [{"class": classes[i], "prob": probs[i]} for i in top]}, indent=1))
        return [path]
    mode = "nearest" if spec.domain == "segment_semantic" else "bilinear"
    p = F.interpolate(pred[None].float(), size=size_hw, mode=mode, **({} if mode == "nearest" else {"align_corners": False}))[0]
    encoded = encode_pixel(spec, p.cpu().numpy())
    paths = [folder / f"{stem}.png", folder / f"{stem}_color.png"]
    paths[0].write_bytes(png_bytes(encoded))
    paths[1].write_bytes(png_bytes(colorize(spec, encoded)))
    return paths


@dataclass
class Predictions:
    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    """Images that could not be read, with the reason; the others are predicted."""


@torch.no_grad()
def predict(model: Path, images: list[Path], out: Path, device: str = "cpu", batch_size: int = 8,
            tasks: list[str] | None = None, step: int | None = None, progress: bool = True) -> Predictions:
    dev = torch.device(device)
    files = image_files(images)
    names_out = dict(zip(files, output_names(files)))
    predictor, names, size, keep = load_predictor(model, dev, tasks, step)
    done = Predictions()
    for start in track(range(0, len(files), batch_size), desc="predict", unit="batch", enabled=progress):
        loaded = []
        for path in files[start:start + batch_size]:
            try:
                loaded.append((path, *load_image(path, size)))
            except (OSError, ValueError) as err:  # a broken or foreign file among many: skip, report
                done.skipped.append((path, _first_line(err)))
        if not loaded:
            continue
        preds = predictor(torch.stack([x for _, x, _ in loaded]).to(dev))
        for i, (path, _, size_hw) in enumerate(loaded):
            for task in names:
                done.written += write_prediction(out, task, names_out[path], preds[task][i], size_hw, keep.get(task))
    return done


def _device_problem(device: str) -> str | None:
    try:
        dev = torch.device(device)
    except RuntimeError:
        return f"{device!r} is not a device (cpu, cuda or cuda:N)"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return f"{device}: no CUDA device is available here (use --device cpu)"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"{device}: this machine has {torch.cuda.device_count()} CUDA devices"
    elif dev.type != "cpu":
        return f"{device}: only cpu and cuda are supported"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m modsquad_ds.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="task export, whole export, export folder or run folder")
    p.add_argument("--images", required=True, nargs="+", type=Path, help="image files and/or folders of images")
    p.add_argument("--out", type=Path, default=Path("predictions"), help="output folder (default: predictions)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:N]")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tasks", nargs="+", help="only these tasks (multi-task models)")
    p.add_argument("--checkpoint", type=int, metavar="STEP", help="run folders: the step (default: the latest)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if problem := _device_problem(args.device):
        p.error(f"--device {problem}")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} is a file, not a folder")
    try:
        done = predict(args.model, args.images, args.out, args.device, args.batch_size, args.tasks,
                       args.checkpoint, not args.no_progress)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path, reason in done.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    print(f"{len(done.written)} files written under {args.out}"
          + (f"; {len(done.skipped)} unreadable images skipped" if done.skipped else ""))
    return 0 if done.written or not done.skipped else 1


if __name__ == "__main__":
    sys.exit(main())
