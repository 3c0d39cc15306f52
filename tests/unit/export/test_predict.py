"""Release encodings round-trip through decode and encode; predict writes files the release decoder
reads back as the model's prediction (real PNG files, an exported task model, the real CLI)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from modsquad_ds.config import load_config
from modsquad_ds.config.loader import to_dict
from modsquad_ds.data import decode
from modsquad_ds.data.encode import encode_pixel, png_bytes
from modsquad_ds.data.tasks import get_task
from modsquad_ds.data.transforms import resize_image
from modsquad_ds.export.files import write_task_model, write_whole_model
from modsquad_ds.export.prune import prune_plan, pruned_task_model
from modsquad_ds.export.task_model import TaskViT
from modsquad_ds.model.vit import ModSquadViT
from modsquad_ds.predict import main as predict_main
from modsquad_ds.train.usage import UsageAccumulator

RNG = np.random.default_rng(0)
PIXEL_DOMAINS = ["depth_zbuffer", "depth_euclidean", "normal", "principal_curvature", "reshading", "edge_texture",
                 "edge_occlusion", "keypoints2d", "keypoints3d", "segment_unsup2d", "segment_unsup25d",
                 "segment_semantic"]


def _release_array(domain: str) -> np.ndarray:
    """A valid release file's array for ``domain`` (what the generator or Taskonomy writes)."""
    h = w = 16
    if domain.startswith("depth"):
        return RNG.integers(0, decode.DEPTH_INVALID_MIN, (h, w)).astype(np.uint16)
    if domain == "normal":  # unit vectors, as the renderer stores them
        n = RNG.normal(size=(h, w, 3))
        n /= np.linalg.norm(n, axis=2, keepdims=True)
        return np.clip(np.rint(n * 127 + 128), 0, 255).astype(np.uint8)
    if domain == "principal_curvature":
        rg = RNG.integers(1, 256, (h, w, 2)).astype(np.uint8)
        return np.concatenate([rg, np.zeros((h, w, 1), np.uint8)], axis=2)
    if domain == "reshading":
        return np.repeat(RNG.integers(0, 256, (h, w, 1)).astype(np.uint8), 3, axis=2)
    if domain in ("edge_texture", "edge_occlusion", "keypoints2d", "keypoints3d"):
        return RNG.integers(0, 65536, (h, w)).astype(np.uint16)
    if domain == "segment_semantic":
        return RNG.integers(1, 18, (h, w)).astype(np.uint8)
    return RNG.integers(0, 256, (h, w)).astype(np.uint8)


@pytest.mark.parametrize("domain", PIXEL_DOMAINS)
def test_encode_inverts_decode(domain):
    spec = get_task(domain)
    raw = _release_array(domain)
    target, _ = decode.to_target(spec, raw, None)
    if domain == "segment_semantic":  # labels -> one-hot scores, as a model outputs
        target = np.eye(spec.channels, dtype=np.float32)[target].transpose(2, 0, 1)
    encoded = encode_pixel(spec, target)
    assert encoded.dtype == raw.dtype and encoded.shape == raw.shape
    if domain == "normal":  # renormalising 8-bit vectors moves a component by at most one step
        assert np.abs(encoded.astype(int) - raw.astype(int)).max() <= 1
    else:
        assert np.array_equal(encoded, raw)
    again = decode.decode_png(png_bytes(encoded))  # through a real PNG file, 16 bits kept
    assert np.array_equal(again, encoded)


def test_encode_keeps_predictions_inside_the_valid_codes():
    depth = encode_pixel(get_task("depth_zbuffer"), np.full((1, 2, 2), 1e6, np.float32))
    assert depth.max() == decode.DEPTH_INVALID_MIN - 1  # never the 'no geometry' code
    normal = encode_pixel(get_task("normal"), np.zeros((3, 2, 2), np.float32))
    assert np.any(normal != 128, axis=2).all()  # never the invalid (128, 128, 128)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tasks = ["class_scene", "depth_zbuffer", "normal"]
    cfg = load_config(preset="tiny", overrides=[f"tasks.names=[{','.join(tasks)}]"])
    torch.manual_seed(0)
    model = ModSquadViT(cfg.model, cfg.moe, cfg.tasks.names).eval()
    out = tmp_path_factory.mktemp("export")
    usage = UsageAccumulator(tasks)
    with torch.no_grad():
        usage.add(model(torch.randn(4, 3, 32, 32)).routing)
    tables = usage.global_tables()

    class W:
        config = cfg

    W.model = model.state_dict()
    for i, task in enumerate(tasks):
        config, state = pruned_task_model(W, task, prune_plan(tables, i, threshold=0.0))
        config["classes"] = list(range(100, 163)) if task == "class_scene" else config.get("classes")
        write_task_model(out, {k: v for k, v in config.items() if v is not None}, state)
    (out / "whole").mkdir()
    write_whole_model(out / "whole", to_dict(cfg), model.state_dict())
    images = tmp_path_factory.mktemp("images")
    for i, size in enumerate([(40, 48), (32, 32), (64, 50)]):
        Image.fromarray(RNG.integers(0, 256, (*size, 3)).astype(np.uint8)).save(images / f"img{i}.png")
    return out, images, model


def _expected(model_out: torch.Tensor, size_hw) -> torch.Tensor:
    return F.interpolate(model_out[None], size=size_hw, mode="bilinear", align_corners=False)[0]


def test_predict_writes_release_files_of_the_models_prediction(exported, tmp_path):
    out, images, _ = exported
    assert predict_main(["--model", str(out), "--images", str(images), "--out", str(tmp_path), "--batch-size", "2",
                         "--no-progress"]) == 0
    depth_model = TaskViT.from_file(out / "depth_zbuffer.safetensors")
    for path in sorted(images.iterdir()):
        rgb = np.asarray(Image.open(path).convert("RGB"))
        x = resize_image(torch.from_numpy(decode.image_to_float(rgb)), 32)[None]
        with torch.no_grad():
            expected = _expected(depth_model(x)[0], rgb.shape[:2])[0].numpy()
        raw = decode.decode_png((tmp_path / "depth_zbuffer" / f"{path.stem}.png").read_bytes())
        assert raw.dtype == np.uint16 and raw.shape == rgb.shape[:2]
        back, _ = decode.to_target(get_task("depth_zbuffer"), raw, None)
        expected = np.clip(expected, 0, (decode.DEPTH_INVALID_MIN - 1) / decode.DEPTH_UNITS_PER_METRE)
        assert np.abs(back[0] - expected).max() <= 0.5 / decode.DEPTH_UNITS_PER_METRE + 1e-6
        colour = np.asarray(Image.open(tmp_path / "depth_zbuffer" / f"{path.stem}_color.png"))
        assert colour.shape == (*rgb.shape[:2], 3) and colour.dtype == np.uint8
        normal = decode.decode_png((tmp_path / "normal" / f"{path.stem}.png").read_bytes())
        assert normal.shape == (*rgb.shape[:2], 3) and normal.dtype == np.uint8
        scores = json.loads((tmp_path / "class_scene" / f"{path.stem}.json").read_text())
        assert scores["classes"] == list(range(100, 163)) and abs(sum(scores["probs"]) - 1) < 1e-5
        assert scores["top5"][0]["prob"] == max(scores["probs"])
        best = sorted(range(63), key=lambda i: -scores["probs"][i])[:5]
        assert scores["top5"] == [{"class": 100 + i, "prob": scores["probs"][i]} for i in best]


def test_predict_with_a_whole_model_equals_the_task_model_files(exported, tmp_path):
    out, images, _ = exported
    assert predict_main(["--model", str(out / "whole" / "whole.safetensors"), "--images", str(images / "img1.png"),
                         "--out", str(tmp_path / "whole"), "--tasks", "depth_zbuffer", "--no-progress"]) == 0
    assert predict_main(["--model", str(out / "depth_zbuffer.safetensors"), "--images", str(images / "img1.png"),
                         "--out", str(tmp_path / "task"), "--no-progress"]) == 0
    a = (tmp_path / "whole" / "depth_zbuffer" / "img1.png").read_bytes()
    assert a == (tmp_path / "task" / "depth_zbuffer" / "img1.png").read_bytes()
    assert not (tmp_path / "whole" / "normal").exists()
    # the folder export --whole wrote, as export prints it, is the same model
    assert predict_main(["--model", str(out / "whole"), "--images", str(images / "img1.png"),
                         "--out", str(tmp_path / "folder"), "--tasks", "depth_zbuffer", "--no-progress"]) == 0
    assert (tmp_path / "folder" / "depth_zbuffer" / "img1.png").read_bytes() == a


def test_predict_bad_input_is_one_line(exported, tmp_path, capsys):
    out, _, _ = exported
    assert predict_main(["--model", str(out), "--images", str(tmp_path / "missing.png"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--images" in err and "missing.png" in err


def test_same_named_images_of_several_folders_keep_their_folder_in_the_name(exported, tmp_path):
    out, images, _ = exported
    for building in ("bldg0", "bldg1"):  # Taskonomy's view names recur in every building
        (tmp_path / "in" / building).mkdir(parents=True)
        shutil.copy(images / "img1.png", tmp_path / "in" / building / "point_0_view_0_domain_rgb.png")
    assert predict_main(["--model", str(out / "normal.safetensors"), "--images", str(tmp_path / "in" / "bldg0"),
                         str(tmp_path / "in" / "bldg1"), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "out" / "normal").iterdir()) == [
        "bldg0__point_0_view_0_domain_rgb.png", "bldg0__point_0_view_0_domain_rgb_color.png",
        "bldg1__point_0_view_0_domain_rgb.png", "bldg1__point_0_view_0_domain_rgb_color.png"]


def test_an_unreadable_image_is_skipped_and_listed(exported, tmp_path, capsys):
    out, images, _ = exported
    shutil.copytree(images, tmp_path / "in")
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert predict_main(["--model", str(out / "normal.safetensors"), "--images", str(tmp_path / "in"),
                         "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "6 files written" in captured.out and "1 unreadable images skipped" in captured.out
    assert captured.err == f"skipped {tmp_path / 'in' / 'broken.png'}: Truncated File Read\n"  # PIL's words
    assert predict_main(["--model", str(out / "normal.safetensors"), "--images", str(tmp_path / "in" / "broken.png"),
                         "--out", str(tmp_path / "out"), "--no-progress"]) == 1  # nothing could be read


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "depth_zbuffer"], "has no model for depth_zbuffer (it has normal)"),
    (["--device", "banana"], "'banana' is not a device"),
    (["--device", "cuda:7"], "cuda:7"),
])
def test_predict_refuses_what_cannot_work_in_one_line(exported, tmp_path, capsys, argv, message):
    out, images, _ = exported
    try:
        code = predict_main(["--model", str(out / "normal.safetensors"), "--images", str(images),
                             "--out", str(tmp_path / "out"), "--no-progress", *argv])
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and message in err


def test_a_whole_model_names_the_tasks_it_lacks(exported, tmp_path, capsys):
    out, images, _ = exported
    assert predict_main(["--model", str(out / "whole" / "whole.safetensors"), "--images", str(images),
                         "--out", str(tmp_path), "--tasks", "normal", "edge_texture", "--no-progress"]) == 2
    assert "the model has no task edge_texture (it has class_scene, depth_zbuffer, normal)" in capsys.readouterr().err


def test_predict_names_a_file_that_is_not_an_export(exported, tmp_path, capsys):
    _, images, _ = exported
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    assert predict_main(["--model", str(tmp_path / "metrics.jsonl"), "--images", str(images), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "metrics.jsonl: not an exported model" in err


def test_image_folders_give_images_of_any_suffix_case_and_tasks_select_models(exported, tmp_path):
    """Cameras write IMG_0001.JPG: upper-case suffixes count; other files in the folder do not.
    --tasks from a folder of task models predicts those tasks only."""
    from modsquad_ds.predict import image_files

    out, images, _ = exported
    folder = tmp_path / "camera"
    folder.mkdir()
    shutil.copy(images / "img0.png", folder / "IMG_0001.PNG")
    shutil.copy(images / "img1.png", folder / "b.png")
    (folder / "notes.txt").write_text("not an image")
    assert image_files([folder]) == [folder / "IMG_0001.PNG", folder / "b.png"]
    assert predict_main(["--model", str(out), "--images", str(folder), "--out", str(tmp_path / "pred"),
                         "--tasks", "normal", "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["normal"]
    assert sorted(p.name for p in (tmp_path / "pred" / "normal").iterdir()) == [
        "IMG_0001.png", "IMG_0001_color.png", "b.png", "b_color.png"]
