"""The planner's arithmetic on hand-computed cases, and its command line (one process, no engine).
Its predictions against real runs: tests/distributed/test_plan_checks.py."""

import pytest

from modsquad_ds.config import load_config
from modsquad_ds.plan import comm
from modsquad_ds.plan.__main__ import main, pick, plan_rows
from modsquad_ds.plan.memory import REDUCE_BUCKET_ELEMENTS, ParamCounts, count_params, state_bytes


def test_state_bytes_by_hand():
    """240 GPUs, ep 8: dense weights partitioned over 240 ranks, each GPU's 1/8 of the experts over
    its expert-data-parallel group of 30 ranks."""
    p = ParamCounts(dense=240_000, mlp_experts=2_400_000)
    s = state_bytes(p, world=240, ep_size=8, zero=1, dtype="bf16")
    part = 240_000 // 240 + 2_400_000 // 8 // 30  # 1,000 + 10,000
    assert s.weights == 2 * (240_000 + 300_000)
    assert (s.master, s.adam, s.step_grads) == (4 * part, 8 * part, 4 * part)
    assert s.grads == s.weights  # ZeRO 1 keeps every local gradient until the step
    assert s.buckets == 2 * REDUCE_BUCKET_ELEMENTS  # bf16 gradients reduce in bf16
    z2 = state_bytes(p, world=240, ep_size=8, zero=2, dtype="bf16")
    assert z2.grads == 2 * part and z2.buckets == 2 * REDUCE_BUCKET_ELEMENTS
    z0 = state_bytes(p, world=240, ep_size=8, zero=0, dtype="fp32")
    assert z0.master == 0 and z0.adam == 8 * 540_000


def test_expert_params_counted_apart():
    cfg = load_config(preset="tiny")
    p = count_params(cfg)
    d, h, experts, layers = 64, 256 // 2, 8, 2  # tiny: 2 MoE MLP layers of 8 experts, hidden 4*64/top-2
    assert p.mlp_experts == layers * experts * (d * h + h + h * d + d)


def test_alltoall_by_hand():
    cfg = load_config(preset="tiny")  # 13 tasks, 17 tokens, 8 experts top-2, dim 64, 2 MoE MLP layers
    c = comm.capacity(cfg, micro_batch=4, capacity_factor=1.0)
    assert c == 2 * 4 * 13 * 17 // 8
    a = comm.alltoall(cfg, micro_batch=4, accumulation=3, ep_size=4, dtype="bf16")
    per_call = 4 * 8 * c * 64 * 2
    assert (a.bytes_per_step, a.calls_per_step) == (2 * 3 * per_call, 2 * 3 * 4)
    assert a.sent_per_step == a.bytes_per_step * 3 // 4
    assert comm.alltoall(cfg, micro_batch=4, accumulation=1, ep_size=1, dtype="bf16").bytes_per_step == 0
    assert comm.seconds(125_000_000, 1.0) == pytest.approx(1.0)


def test_pick_prefers_fewer_micro_steps_then_less_traffic():
    cfg = load_config(preset="tiny")
    p = count_params(cfg)
    kw = dict(gpus=8, global_batch=64, zero=1, dtype="fp32", link_gbps=100, capacity_factor=1.0, reserve_gib=0)
    roomy = plan_rows(cfg, p, gpu_mem_gib=4, ep_sizes=[1, 2, 8], **kw)
    assert [r.accumulation for r in roomy] == [1, 1, 1]
    assert pick(roomy)[0].ep_size == 1  # no all-to-all at all
    tight = plan_rows(cfg, p, gpu_mem_gib=0.01, ep_sizes=[1, 2], **kw)
    assert not any(r.fits for r in tight) and pick(tight)[0] is None


def test_when_nothing_fits_the_advice_names_only_what_is_not_chosen_yet(capsys):
    base = ["--preset", "small", "--gpus", "1", "--gpu-mem-gib", "2.5", "--global-batch", "1"]
    assert main(base + ["--dtype", "fp32", "--zero", "1"]) == 1
    assert capsys.readouterr().out.strip().endswith(
        "no ep_size fits even one image per GPU: use more or larger GPUs, bf16, ZeRO 2, model.grad_checkpointing=true")
    assert main(base + ["--zero", "2", "--set", "model.grad_checkpointing=true"]) == 1
    assert capsys.readouterr().out.strip().endswith("no ep_size fits even one image per GPU: use more or larger GPUs")


def test_command_line_prints_the_table_and_a_pick(capsys):
    assert main(["--preset", "tiny", "--gpus", "8", "--gpu-mem-gib", "2", "--global-batch", "64",
                 "--step-time-s", "0.5", "--images", "1000", "--epochs", "1", "--reserve-gib", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "| 1 |" in out and "| 8 |" in out and "pick: ep_size" in out
    assert "128 images/s" in out  # 64 images per 0.5 s step


@pytest.mark.parametrize("argv, message", [
    (["--ep-size", "3"], "--ep-size 3 must divide"),
    (["--global-batch", "65"], "multiple of --gpus"),
    (["--zero", "0", "--dtype", "bf16"], "bf16 needs ZeRO 1 or 2"),
    (["--set", "moe.mlp.top_k=99"], "moe.mlp.top_k"),
    (["--ep-size", "-4"], "--ep-size must be >= 1, got -4"),  # -4 divides 8 in Python
    (["--link-gbps", "0"], "--link-gbps must be > 0, got 0"),
    (["--capacity-factor", "0.5"], "--capacity-factor must be >= 1, got 0.5"),
    (["--step-time-s", "-1"], "--step-time-s must be > 0, got -1"),
])
def test_bad_input_one_line(argv, message, capsys):
    base = ["--preset", "tiny", "--gpus", "8", "--gpu-mem-gib", "2", "--global-batch", "64"]
    try:
        code = main(base + argv)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 2
        print(exit_.code)
    captured = capsys.readouterr()
    assert code != 0 and message in captured.err + captured.out


def test_partitions_round_up_when_ranks_do_not_divide_the_parameters():
    """ZeRO pads every partition to the same size: 1001 dense weights over 4 ranks is 251 per rank,
    8 local experts' 16 weights (ep 2) over their 2-rank group is 4: 255 fp32 elements per rank."""
    s = state_bytes(ParamCounts(dense=1001, mlp_experts=16), world=4, ep_size=2, zero=1, dtype="fp32")
    assert (s.master, s.adam, s.step_grads) == (4 * 255, 8 * 255, 4 * 255)
    assert s.weights == s.grads == 4 * (1001 + 8)


def test_pick_takes_fewer_micro_steps_over_less_all_to_all():
    from modsquad_ds.plan.__main__ import Row

    def row(ep, accumulation, alltoall_s, fits=True):
        return Row(ep, {}, 0.0, 1, accumulation, 0.0, 0.0, alltoall_s, fits)

    rows = [row(1, 4, 0.0), row(2, 2, 0.5), row(4, 2, 0.2), row(8, 1, 0.9, fits=False)]
    assert pick(rows)[0].ep_size == 4  # fewest micro steps that fit (2), then less all-to-all time
    assert pick([row(2, 1, 0.1), row(4, 1, 0.1)])[0].ep_size == 2  # a tie: the smaller ep_size


def test_frozen_weights_hold_only_their_training_dtype_copy():
    """Router fine-tuning: 1,000 dense weights of which 900 frozen, 4,000 experts all frozen, ep 2.
    Only the 100 trained weights have gradients and Adam moments; bf16 without ZeRO
    (FP16_UnfusedOptimizer) adds their fp32 copies and, during the step, fp32 gradients."""
    p = ParamCounts(dense=1_000, mlp_experts=4_000, frozen_dense=900, frozen_experts=4_000)
    assert p.trainable == 100
    s = state_bytes(p, world=4, ep_size=2, zero=0, dtype="bf16")
    assert s.weights == 2 * (1_000 + 2_000)
    assert (s.grads, s.master, s.adam, s.step_grads, s.buckets) == (2 * 100, 4 * 100, 8 * 100, 4 * 100, 0)
    f = state_bytes(p, world=4, ep_size=2, zero=0, dtype="fp32")  # torch's AdamW on the fp32 weights
    assert (f.weights, f.grads, f.master, f.adam, f.step_grads) == (4 * 3_000, 4 * 100, 0, 8 * 100, 0)
    z1 = state_bytes(p, world=4, ep_size=2, zero=1, dtype="fp32")  # ZeRO partitions only what trains
    assert (z1.master, z1.adam, z1.grads) == (4 * 25, 8 * 25, 4 * 100)


@pytest.mark.parametrize("mode", ["routers", "heads", "all"])
def test_trainable_counts_are_what_the_trainer_freezes(mode):
    """count_params selects by the fine-tuning code's own rule; checked against freeze() on the
    trainer's module (model and objective)."""
    import torch

    from modsquad_ds.distributed.collectives import all_reduce_sum_autograd
    from modsquad_ds.finetune import freeze
    from modsquad_ds.model.factory import build_model
    from modsquad_ds.model.objective import MultiTaskObjective
    from modsquad_ds.train.module import TrainModule

    cfg = load_config(preset="tiny", overrides=[f"finetune.mode={mode}", "finetune.init_from=runs/source",
                                                "tasks.names=[class_object,normal]"])
    p = count_params(cfg)
    torch.manual_seed(0)
    report = freeze(TrainModule(build_model(cfg), MultiTaskObjective(cfg), all_reduce_sum_autograd), mode)
    assert (p.trainable, p.total - p.trainable) == (report.trainable, report.frozen)
    assert p.frozen_experts == (0 if mode == "all" else p.mlp_experts)


def test_fine_tuning_plans_at_the_stage_it_trains_at(capsys):
    """Modes routers and heads run at ZeRO 0 (finetune.source.zero_stage), bf16 included; the
    header says what trains and the stage replaced."""
    argv = ["--preset", "tiny", "--gpus", "2", "--gpu-mem-gib", "4", "--global-batch", "8", "--zero", "2",
            "--set", "finetune.mode=routers", "--set", "finetune.init_from=runs/source"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "ZeRO 0, bf16" in out and "finetune.mode routers: ZeRO stage 2 -> 0" in out
    assert "M train (finetune.mode routers)" in out
    for training_experts in (argv[:-4], argv[:-4] + ["--set", "finetune.mode=all"] + argv[-2:]):
        assert main(training_experts + ["--zero", "0"]) == 2  # bf16 without ZeRO stays refused
        assert "bf16 needs ZeRO 1 or 2" in capsys.readouterr().err
