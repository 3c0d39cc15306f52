"""Evaluation on CUDA gives the CPU's numbers (batches are moved to the model's device; sums stay
float64 on the CPU). Skipped without a GPU."""

from __future__ import annotations

import copy

import pytest
import torch

from data_tools import make_shards
from data_tools.mini_taskonomy import generate
from modsquad_ds.config import load_config
from modsquad_ds.eval.runner import evaluate_model
from modsquad_ds.model import build_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_cuda_evaluation_equals_cpu(tmp_path):
    generate(tmp_path / "raw", buildings=3, points=2, views=2, resolution=32, seed=4, workers=1, progress=False)
    assert make_shards.main(["--root", str(tmp_path / "raw"), "--out", str(tmp_path / "shards"), "--split", "test",
                             "--split-csv", str(tmp_path / "raw" / "splits" / "train_val_test_mini.csv"),
                             "--no-progress", "--workers", "1"]) == 0
    cfg = load_config(["configs/demo.yaml"], [f"data.shards_dir={tmp_path / 'shards'}", "data.batch_size=3",
                                              "data.workers=0"])
    torch.manual_seed(0)
    cpu_model = build_model(cfg)
    gpu_model = copy.deepcopy(cpu_model).cuda()
    on_cpu = evaluate_model(cpu_model, cfg, "test")
    on_gpu = evaluate_model(gpu_model, cfg, "test")
    assert on_cpu.samples == on_gpu.samples == 4
    for task, metrics in on_cpu.metrics.items():
        for key, value in metrics.items():
            assert on_gpu.metrics[task][key] == pytest.approx(value, rel=1e-3, abs=1e-5), (task, key)
    assert on_gpu.usage["mean_mi"] == pytest.approx(on_cpu.usage["mean_mi"], rel=1e-3, abs=1e-6)
