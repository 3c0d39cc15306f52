"""model.compile: compiled blocks compute what eager blocks compute, and the module itself does not
change (names, state dict), so checkpoints, the export tools and DeepSpeed see the same model.
Compiles the tiny preset's blocks on CPU (about 30 s)."""

import pytest
import torch
import torch._inductor.config as inductor_config
from _compiled_blocks import graph_breaks_per_block

from modsquad_ds.config import ConfigError, load_config
from modsquad_ds.config.schema import installed_torch
from modsquad_ds.data.synthetic import synthetic_batch
from modsquad_ds.model import build_model
from modsquad_ds.model.objective import MultiTaskObjective
from modsquad_ds.moe.ds_adapter import convert_to_expert_parallel
from modsquad_ds.moe.kernels import has_grouped_mm
from modsquad_ds.train.module import TrainModule


def _trainer_module(cfg):
    """As build_engine builds it, before DeepSpeed: MoE MLP layers converted at ep_size 1."""
    torch.manual_seed(0)
    model = build_model(cfg)
    convert_to_expert_parallel(model, cfg.train.ep_size)
    return TrainModule(model, MultiTaskObjective(cfg), lambda t: t)


@pytest.mark.slow
def test_compiled_blocks_equal_eager_blocks(monkeypatch):
    # inductor draws its own random numbers unless told to call eager's (router noise, drop path)
    monkeypatch.setattr(inductor_config, "fallback_random", True)
    cfg = load_config(preset="tiny", overrides=["model.compile=true", "model.drop_path_rate=0.1"])
    eager, compiled = _trainer_module(cfg), _trainer_module(cfg)
    names, keys = [n for n, _ in compiled.named_parameters()], list(compiled.state_dict())
    compiled.model.compile_blocks()
    assert [n for n, _ in compiled.named_parameters()] == names and list(compiled.state_dict()) == keys
    batch = synthetic_batch(cfg.tasks.names, 2, cfg.model.img_size, torch.Generator().manual_seed(0))
    results = []
    for module in (eager, compiled):
        torch.manual_seed(5)
        loss, stats, _ = module(batch)
        loss.backward()
        results.append((loss.detach(), stats, {n: p.grad for n, p in module.named_parameters() if p.grad is not None}))
    (loss_e, stats_e, grads_e), (loss_c, stats_c, grads_c) = results
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for key in stats_e:
        torch.testing.assert_close(stats_c[key], stats_e[key], rtol=1e-4, atol=1e-6)
    assert grads_c.keys() == grads_e.keys()
    for name, g in grads_e.items():  # fused kernels sum in another order: float32 rounding
        rel = ((grads_c[name] - g).norm() / g.norm().clamp_min(1e-12)).item()
        assert rel < 1e-4, f"{name}: relative difference {rel:.2e}"


@pytest.mark.skipif(not has_grouped_mm() or installed_torch() < (2, 10),
                    reason="model.compile needs torch >= 2.10 and the grouped kernel grouped_mm")
@pytest.mark.parametrize("params", ["fp32_autocast", "bf16"])
def test_every_block_compiles_to_one_graph(params):
    """No graph breaks in a block on the path sm90+ GPUs compile (bf16, the grouped expert kernel; the
    loop kernel reads the counts on the host, a break by design). torch 2.11's compiler could not
    trace ``torch.amp.is_autocast_available``: each router and expert projection that asked it broke
    the block, 15-17 graphs per block (moe/amp.py). This torch (constraints.txt) traces it, so here the
    test guards against new breaks; its twin in tests/gpu runs on the GPU machine's torch 2.11."""
    assert not graph_breaks_per_block("cpu", "grouped", params)


def test_compile_refuses_expert_parallelism():
    with pytest.raises(ConfigError, match=r"model\.compile.*train\.ep_size 1"):
        load_config(preset="tiny", overrides=["model.compile=true", "train.ep_size=2"])


def test_compile_refuses_a_torch_whose_compiler_fails_on_the_blocks(monkeypatch):
    """torch 2.4-2.9 (tested one by one) fail to compile the MoE blocks, each in its own way mid-run:
    the setting is refused up front, naming the version."""
    from modsquad_ds.config import schema

    assert schema.installed_torch() >= (2, 10)  # this environment (constraints.txt) compiles
    monkeypatch.setattr(schema, "installed_torch", lambda: (2, 9))
    with pytest.raises(ConfigError, match=r"model\.compile: needs torch >= 2\.10, this is 2\.9"):
        load_config(preset="tiny", overrides=["model.compile=true"])
    load_config(preset="tiny", overrides=["model.compile=false"])  # the default needs nothing
