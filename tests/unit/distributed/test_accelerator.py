"""DeepSpeed's accelerator follows the machine unless the user chose one, and a CUDA accelerator
answers free memory whatever names the GPU in ``CUDA_VISIBLE_DEVICES`` (its CUDA run:
tests/gpu/test_trainer_cuda.py, a launch that names its GPU by UUID)."""

import pytest
import torch
from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator
from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

from modsquad_ds.distributed.accelerator import free_memory_from_cuda, pin_deepspeed_accelerator

UUID = "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6"


def test_follows_the_machine_and_keeps_a_user_choice(monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    assert pin_deepspeed_accelerator() == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("DS_ACCELERATOR", "xpu")
    assert pin_deepspeed_accelerator() == "xpu"


def test_deepspeed_cannot_map_a_gpu_named_by_uuid_to_nvml(monkeypatch):
    """Why the accelerator is changed: the mapping DeepSpeed's NVML query uses parses integers only.
    When a DeepSpeed upgrade fixes it (its pull request 8510), this fails: the change can go."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", UUID)
    with pytest.raises(ValueError, match="invalid literal for int"):
        CUDA_Accelerator()._get_nvml_gpu_id(0)


def test_a_cuda_accelerator_asks_cuda_for_the_free_memory_of_the_device(monkeypatch):
    # no GPU here: cudaMemGetInfo's answer is given, what is checked is who is asked and with what
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: asked.append(device) or (7 << 30, 8 << 30))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", UUID)
    accelerator = CUDA_Accelerator()
    assert free_memory_from_cuda(accelerator)
    assert accelerator.available_memory() == 7 << 30 and accelerator.available_memory(0) == 7 << 30
    assert asked == [None, 0]  # None: the current device, the one init_distributed set
    assert CUDA_Accelerator().available_memory.__func__ is CUDA_Accelerator.available_memory  # others keep theirs


def test_other_accelerators_are_left_as_they_are():
    cpu = CPU_Accelerator()
    assert not free_memory_from_cuda(cpu)
    assert "available_memory" not in vars(cpu)
