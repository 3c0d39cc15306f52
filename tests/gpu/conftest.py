"""tests/gpu: CUDA only (marker ``gpu``), skipped where no GPU is visible. Run by benchmarks/gpu_check.sh.

tests/conftest.py pins DeepSpeed to its CPU accelerator for the CPU suite; these tests launch the
trainer in subprocesses with ``DS_ACCELERATOR=cuda`` and touch no DeepSpeed accelerator in-process.

Every test compares CUDA against the CPU or a reference in fp32 without TF32 (cuDNN allows it by
default: the patch embedding's convolution in TF32 moves the tokens by ~5e-4, enough to flip a
near-tie in a router's top-k), each test for itself: set and restored around it.
"""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_tf32(monkeypatch):
    if torch.cuda.is_available():
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
