"""Batches reach the device the engine put the module on (the CUDA crash of issue 7).

No GPU here, so "meta" stands in for the other device: a module on meta must receive meta tensors.
"""

import pytest
import torch

from modsquad_ds.config import load_config
from modsquad_ds.data.synthetic import synthetic_batch
from modsquad_ds.model import build_model
from modsquad_ds.model.objective import MultiTaskObjective
from modsquad_ds.train.module import TrainModule, to_device


class _Seen(Exception):
    pass


def test_the_model_receives_the_batch_on_its_own_device():
    cfg = load_config(preset="tiny")
    module = TrainModule(build_model(cfg), MultiTaskObjective(cfg), lambda t: t).to("meta")
    seen = {}

    def record(_, args):
        seen["image"] = args[0]
        raise _Seen  # meta tensors have no values: stop once the input is known

    module.model.register_forward_pre_hook(record)
    with pytest.raises(_Seen):
        module(synthetic_batch(cfg.tasks.names, 2, cfg.model.img_size, torch.Generator().manual_seed(0)))
    assert seen["image"].device.type == "meta"
    assert seen["image"].dtype == torch.float32


def test_to_device_moves_every_tensor_and_keeps_the_rest():
    batch = {"image": torch.zeros(2, 3), "targets": {"depth": torch.ones(2)}, "masks": {},
             "keys": ["a", "b"], "pair": (torch.ones(1), 3)}
    moved = to_device(batch, torch.device("meta"))
    assert moved["image"].is_meta and moved["targets"]["depth"].is_meta and moved["pair"][0].is_meta
    assert moved["keys"] == ["a", "b"] and moved["pair"][1] == 3 and moved["masks"] == {}
    assert batch["image"].device.type == "cpu"  # the input batch is not modified


def test_the_whole_step_runs_where_the_module_is():
    cfg = load_config(preset="tiny")
    torch.manual_seed(0)
    module = TrainModule(build_model(cfg), MultiTaskObjective(cfg), lambda t: t)
    loss, stats, routing = module(synthetic_batch(cfg.tasks.names, 2, cfg.model.img_size, torch.Generator().manual_seed(0)))
    loss.backward()
    devices = {loss.device} | {v.device for v in stats.values()} | {r.prob_table_TE.device for r in routing}
    assert devices == {torch.device("cpu")}
    assert torch.stack(list(stats.values())).isfinite().all()  # the trainer stacks them on one device
