"""DeepSpeed's accelerator follows the machine unless the user chose one."""

import torch

from modsquad_ds.distributed.accelerator import pin_deepspeed_accelerator


def test_follows_the_machine_and_keeps_a_user_choice(monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    assert pin_deepspeed_accelerator() == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("DS_ACCELERATOR", "xpu")
    assert pin_deepspeed_accelerator() == "xpu"
