"""tests/gpu: CUDA only (marker ``gpu``), skipped where no GPU is visible. Run by benchmarks/gpu_check.sh.

tests/conftest.py pins DeepSpeed to its CPU accelerator for the CPU suite; these tests launch the
trainer in subprocesses with ``DS_ACCELERATOR=cuda`` and touch no DeepSpeed accelerator in-process.
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
