"""Exported task models and predict on a CUDA device equal the CPU results (skipped without CUDA)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from modsquad_ds.config import load_config
from modsquad_ds.export.files import write_task_model
from modsquad_ds.export.prune import prune_plan, pruned_task_model
from modsquad_ds.export.task_model import TaskViT
from modsquad_ds.model.vit import ModSquadViT
from modsquad_ds.predict import predict
from modsquad_ds.train.usage import UsageAccumulator

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


class _Weights:
    def __init__(self, model, config):
        self.model, self.config = model, config


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cfg = load_config(preset="tiny", overrides=["tasks.names=[depth_zbuffer,normal]"])
    torch.manual_seed(0)
    model = ModSquadViT(cfg.model, cfg.moe, cfg.tasks.names).eval()
    usage = UsageAccumulator(cfg.tasks.names)
    with torch.no_grad():
        usage.add(model(torch.randn(4, 3, 32, 32)).routing)
    out = tmp_path_factory.mktemp("export")
    for i, task in enumerate(cfg.tasks.names):
        config, state = pruned_task_model(_Weights(model.state_dict(), cfg), task,
                                          prune_plan(usage.global_tables(), i, threshold=0.0))
        write_task_model(out, config, state)
    return out


def test_task_model_on_cuda_equals_cpu(exported):
    x = torch.randn(3, 3, 32, 32)
    cpu = TaskViT.from_file(exported / "normal.safetensors")
    cuda = TaskViT.from_file(exported / "normal.safetensors", device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(cuda(x.cuda()).cpu(), cpu(x), rtol=1e-3, atol=1e-3)


def test_predict_on_cuda_writes_what_cpu_writes(exported, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 36, 3)).astype(np.uint8)).save(images / "a.png")
    predict(exported, [images], tmp_path / "cpu", device="cpu", progress=False)
    predict(exported, [images], tmp_path / "cuda", device="cuda", progress=False)
    for task in ("depth_zbuffer", "normal"):
        a = np.asarray(Image.open(tmp_path / "cpu" / task / "a.png")).astype(int)
        b = np.asarray(Image.open(tmp_path / "cuda" / task / "a.png")).astype(int)
        assert a.shape == b.shape and np.abs(a - b).max() <= 2  # TF32 / kernel rounding, in encoding steps
