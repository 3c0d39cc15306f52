"""The real training command under real launchers: exact resume, bounded failure, early refusal.

Each test launches ``python -m modsquad_ds.train`` on a mini-Taskonomy written by the real tools.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from _launch import BIN, base_env, mini_shards, python, run, run_ok

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """4 buildings x 3 points x 3 views at 32 px: 18 training samples in shards of 5 (uneven), 9 for
    validation."""
    return mini_shards(tmp_path_factory.mktemp("train_mini"), points=3, views=3, seed=1, samples_per_shard=5,
                       splits=("train", "val"))


def _args(shards: Path, out: Path, *extra: str) -> list[str]:
    args = ["-m", "modsquad_ds.train", "--config", "configs/demo.yaml", "--set", f"data.shards_dir={shards}",
            "--set", "data.batch_size=4", "--set", "train.steps=7", "--set", "train.warmup_steps=2",
            "--set", "train.log_every=1", "--set", f"train.out_dir={out}"]
    for item in extra:
        args += ["--set", item]
    return args


def _losses(out: Path) -> dict[int, dict[str, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith(("loss/", "mi/"))} for r in rows}


def _torchrun(nproc: int) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}"]


@pytest.mark.parametrize("nproc, extra", [
    (1, ["train.ep_size=1", "data.workers=0"]),
    (2, ["train.ep_size=2", "data.workers=2", "train.grad_accum=2"]),
])
def test_resume_equals_uninterrupted(shards, tmp_path, nproc, extra):
    launcher = _torchrun(nproc) if nproc > 1 else [python()]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run_ok(launcher + _args(shards, whole, *extra), timeout_s=240)
    first = run_ok(launcher + _args(shards, parts, *extra, "train.stop_after=3"), timeout_s=240)
    assert "stopped early" in first.output
    assert (parts / "checkpoints" / "step_00000003").is_dir()
    run_ok(launcher + _args(shards, parts, *extra), timeout_s=240)

    expected, resumed = _losses(whole), _losses(parts)
    assert sorted(expected) == sorted(resumed) == list(range(1, 8))
    for step in range(4, 8):  # fp32 on CPU: bit-identical, not merely close
        assert resumed[step] == expected[step], f"step {step} differs after resume"
    # with data.batch_size 4 x ranks x grad_accum, 7 steps cross epoch boundaries of 18 samples
    # expert usage is summed over every rank and every step, across the resume too
    usage, usage_whole = (json.loads((out / "usage.json").read_text()) for out in (parts, whole))
    assert usage["tasks"] == usage_whole["tasks"]
    assert len(usage["layers"]) == 4
    assert [layer["counts"] for layer in usage["layers"]] == [layer["counts"] for layer in usage_whole["layers"]]


def test_validation_leaves_training_unchanged(shards, tmp_path):
    """train.eval_every validates between steps without touching the training: the same losses at
    every step as a run without it (its loader has a generator of its own; its loader once drew from
    the router noise's stream). With noise in evaluation too (moe.eval_noise, the authors' setting),
    validation draws from that stream itself, and the RNG states are put back.

    The validated run stops after step 4 and resumes: its step 4 was saved and then validated, so
    the resumed run does not validate it again. What a crashed run may leave after its checkpoint (a
    later step's row, a line cut short) is dropped on resume, as metrics.jsonl's rows are."""
    plain, validated = tmp_path / "plain", tmp_path / "validated"
    run_ok([python()] + _args(shards, plain, "train.ep_size=1", "data.workers=2"), timeout_s=240)
    with_validation = _args(shards, validated, "train.ep_size=1", "data.workers=2", "train.eval_every=2",
                            "moe.eval_noise=true")
    run_ok([python()] + with_validation + ["--set", "train.stop_after=4"], timeout_s=240)
    with open(validated / "eval_during_training.jsonl", "a") as f:
        f.write('{"step": 6, "left by a crash": 1}\n{"step": 6, "eval_')
    assert "validating first" not in run_ok([python()] + with_validation, timeout_s=240).output
    assert _losses(validated) == _losses(plain)
    evals = [json.loads(line) for line in (validated / "eval_during_training.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 4, 6] and all(len(e) > 1 and "left by a crash" not in e for e in evals)


def test_a_stop_signal_during_validation_saves_the_run(shards, tmp_path):
    """SIGTERM to the whole session (as Slurm and torchrun send it) while validation's loader workers
    run: they ignore it like the training loader's, and the run saves and stops as anywhere else,
    without validating at its last step; resumed, it validates that step first. They once died of
    it, and the run with them, its last steps unsaved.

    The signal must find validation's workers alive and running: the rank is frozen (SIGSTOP) once it
    has more children than the training loader's two (in the first steps of a 9-batch epoch the next
    epoch's loader has not started, train/epochs.py, so the extra ones are validation's), and they
    are given time to leave the fork (a child still in it runs the rank's own signal handlers)."""
    import psutil

    out = tmp_path / "run"
    proc = subprocess.Popen([python()] + _args(shards, out, "train.ep_size=1", "data.workers=2", "data.batch_size=2",
                                               "train.steps=100000", "train.eval_every=1"),
                            env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=Path(__file__).parents[2])
    rank = psutil.Process(proc.pid)
    steps = lambda: len((out / "metrics.jsonl").read_text().splitlines()) if (out / "metrics.jsonl").is_file() else 0
    caught = False
    try:
        deadline = time.monotonic() + 120
        while not caught and steps() < 4:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate(timeout=30)[0][-3000:]
            if len(rank.children()) > 2:
                rank.suspend()
                caught = len(rank.children()) > 2 and steps() < 4  # validation's workers, alive until it resumes
                if caught:
                    time.sleep(0.5)  # they have just forked: let them reach their loop, where they wait
                    os.killpg(proc.pid, signal.SIGTERM)
                rank.resume()
            time.sleep(0.002)
        if not caught:  # it would train on: end it, and say why below
            os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert caught, f"validation's workers were never seen in the first 3 steps\n{output[-3000:]}"
    assert proc.returncode == 3, output[-3000:]
    assert "exited unexpectedly" not in output and "killed by signal" not in output
    assert "stopped by SIGTERM or Ctrl-C, exit code 3" in output
    last = int((out / "checkpoints" / "latest").read_text().split("_")[1])
    assert last == steps(), "the stop checkpoint is the last step taken"
    # the stop step's validation gives way to the stop (train.eval_every=1: every step has one)
    assert f"step {last}: validation skipped (stopping)" in output
    evals = (out / "eval_during_training.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in evals] == list(range(1, last))
    # resumed, the run validates that step first: the curve keeps every point, each once
    resumed = run_ok([python()] + _args(shards, out, "train.ep_size=1", "data.workers=2", "data.batch_size=2",
                                        f"train.steps={last + 1}", "train.eval_every=1"), timeout_s=240)
    assert f"step {last}: validating first" in resumed.output
    evals = (out / "eval_during_training.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in evals] == list(range(1, last + 2))


def test_saved_run_folder_has_config_checkpoint_and_logs(shards, tmp_path):
    out = tmp_path / "run"
    result = run_ok([python()] + _args(shards, out, "train.ep_size=1", "data.workers=0",
                                      "train.checkpoint_every=3", "train.keep_checkpoints=1"), timeout_s=240)
    assert f"run folder: {out}" in result.output
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_00000007"], "keep_checkpoints=1 keeps only the newest"
    assert (out / "checkpoints" / "latest").read_text() == "step_00000007"
    files = {p.name for p in (out / "checkpoints" / "step_00000007").iterdir()}
    assert "mp_rank_00_model_states.pt" in files
    assert {f"layer_{l}_expert_{e}_mp_rank_00_model_states.pt" for l in (0, 1) for e in range(8)} <= files
    assert not list((out / "checkpoints").glob(".partial-*"))
    from modsquad_ds.config import load_config

    saved = load_config([out / "config.yaml"])
    assert saved.train.steps == 7 and saved.data.batch_size == 4
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "usage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    losses = _losses(out)
    assert set(losses[1]) >= {"loss/total", "loss/normal", "mi/blocks.0.attn", "mi/blocks.1.mlp"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:  # the throughput and the share of it lost waiting for the loader, every logged step
        assert row["perf/images_per_s"] > 0 and 0.0 <= row["perf/data_wait_pct"] < 100.0
        assert "perf/max_memory_gib" not in row  # CUDA only (tests/gpu/test_trainer_cuda.py)


def test_interrupted_save_leaves_previous_checkpoint_usable(shards, tmp_path):
    out = tmp_path / "run"
    run_ok([python()] + _args(shards, out, "train.ep_size=1", "data.workers=0", "train.stop_after=3"),
           timeout_s=240)
    partial = out / "checkpoints" / ".partial-step_00000005"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"truncated by a crash")
    result = run_ok([python()] + _args(shards, out, "train.ep_size=1", "data.workers=0"), timeout_s=240)
    assert "resumed from" in result.output and "step_00000003" in result.output
    assert not partial.exists(), "the next save removes the leftover partial folder"


def test_starting_over_in_a_used_folder_sets_the_earlier_run_aside(shards, tmp_path):
    """--no-resume where a run saved steps 6 and 7: the new run's steps 3 and 4 would have been
    pruned as the oldest, and a plain resume would have continued the earlier run."""
    out = tmp_path / "run"
    common = ("train.ep_size=1", "data.workers=0", "train.checkpoint_every=3")
    run_ok([python()] + _args(shards, out, *common), timeout_s=240)
    again = run_ok([python()] + _args(shards, out, *common, "train.steps=4") + ["--no-resume"], timeout_s=240)
    assert "the earlier run's files" in again.output and "moved to replaced-" in again.output
    steps = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert steps == ["step_00000003", "step_00000004"]
    assert (out / "checkpoints" / "latest").read_text() == "step_00000004"
    assert sorted(_losses(out)) == [1, 2, 3, 4]
    (aside,) = out.glob("replaced-*")
    assert sorted(p.name for p in (aside / "checkpoints").iterdir() if p.name.startswith("step_")) == [
        "step_00000006", "step_00000007"]
    assert sorted(_losses(aside)) == list(range(1, 8))
    resumed = run_ok([python()] + _args(shards, out, *common, "train.steps=5"), timeout_s=240)
    assert "resumed from" in resumed.output and "step_00000004" in resumed.output


def test_bad_parallel_settings_fail_before_any_process_group(shards, tmp_path):
    # WORLD_SIZE=2 with no second rank: reaching init would hang until the timeout
    env = base_env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29555")
    for setting, key in (("train.ep_size=3", "train.ep_size"), ("train.zero_stage=3", "train.zero_stage"),
                         ("data.shards_dir=/nonexistent", "data.shards_dir")):
        result = run([python()] + _args(shards, tmp_path / "bad", setting), timeout_s=60, env=env)
        assert result.returncode == 2, result.output
        lines = [l for l in result.output.splitlines() if l.startswith("error:")]
        assert len(lines) == 1 and key in lines[0], result.output
        assert result.seconds < 30


def test_killed_rank_ends_the_job_within_bounded_time(shards, tmp_path):
    """Plain processes (no launcher to clean up): the survivor must notice and exit by itself."""
    port = 29000 + os.getpid() % 1000
    out = tmp_path / "run"
    procs = []
    for rank in range(2):
        env = base_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        cmd = [python()] + _args(shards, out, "train.ep_size=2", "data.workers=0", "train.steps=100000",
                                 "train.warmup_steps=0", "train.heartbeat_timeout_s=10")
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True, cwd=Path(__file__).parents[2]))
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").is_file() or len((out / "metrics.jsonl").read_text().splitlines()) < 2:
            assert time.monotonic() < deadline, "training did not start"
            assert procs[0].poll() is None, procs[0].communicate()[0]
            time.sleep(0.5)
        os.kill(procs[1].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        output, _ = procs[0].communicate(timeout=90)
        ended_after = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert procs[0].returncode not in (0, None)
    assert ended_after < 60, f"survivor took {ended_after:.0f} s"
    assert "[modsquad_ds.distributed]" in output, output[-3000:]


def test_nan_storm_ends_every_rank_with_a_clear_message(shards, tmp_path):
    # lr 1e6 blows the weights up within a step or two: the loss turns NaN on every rank
    result = run(_torchrun(2) + _args(shards, tmp_path / "nan", "train.ep_size=2", "data.workers=0",
                                      "train.lr=1e6", "train.warmup_steps=0", "train.steps=50",
                                      "train.nonfinite_patience=2"), timeout_s=180)
    assert result.returncode != 0
    assert result.output.count("loss was NaN/inf on some rank for 2 consecutive micro steps") == 2, \
        result.output[-3000:]
    assert "exitcode  : 76" in result.output, result.output[-3000:]  # torchrun names the failed rank


def test_single_process_nan_storm_exit_code(shards, tmp_path):
    result = run([python()] + _args(shards, tmp_path / "nan1", "train.ep_size=1", "data.workers=0",
                                    "train.lr=1e6", "train.warmup_steps=0", "train.steps=50"), timeout_s=180)
    assert result.returncode == 76, result.output[-3000:]
    assert "stopping (lower train.lr or check the data)" in result.output


@pytest.mark.parametrize("launcher", ["deepspeed", "mpiexec"])
def test_training_runs_unchanged_under_other_launchers(shards, tmp_path, launcher):
    from modsquad_ds.distributed.env import free_port

    out = tmp_path / launcher
    args = _args(shards, out, "train.ep_size=2", "data.workers=0", "train.steps=3")
    if launcher == "deepspeed":
        cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
               "--module", *args[1:]]
    else:
        cmd = [str(BIN / "mpiexec"), "-n", "2", python(), *args]
    result = run_ok(cmd, timeout_s=180)
    assert "world=2 dp=2 ep=2" in result.output
    assert f"launcher={'mpi' if launcher == 'mpiexec' else 'deepspeed'}" in result.output
    assert sorted(_losses(out)) == [1, 2, 3]


@pytest.mark.parametrize("ds_config", sorted(p.name for p in (Path(__file__).parents[2] / "ds_configs").glob("*.json")))
def test_every_shipped_deepspeed_config_trains_with_expert_parallelism(shards, tmp_path, ds_config):
    out = tmp_path / ds_config
    result = run_ok(_torchrun(2) + _args(shards, out, "train.ep_size=2", "data.workers=0", "train.steps=2",
                                         "train.warmup_steps=0", f"train.ds_config=ds_configs/{ds_config}"),
                    timeout_s=180)
    zero = json.loads((Path(__file__).parents[2] / "ds_configs" / ds_config).read_text())["zero_optimization"]["stage"]
    assert f"zero={zero}" in result.output
    losses = _losses(out)
    assert sorted(losses) == [1, 2]
    assert all(math.isfinite(v) for row in losses.values() for v in row.values())


def test_resume_under_a_different_layout_is_refused_with_the_setting_named(shards, tmp_path):
    out = tmp_path / "run"
    run_ok([python()] + _args(shards, out, "train.ep_size=1", "data.workers=0", "train.stop_after=2"),
           timeout_s=240)
    result = run([python()] + _args(shards, out, "train.ep_size=1", "data.workers=0", "data.batch_size=2"),
                 timeout_s=240)
    assert result.returncode == 2, result.output[-3000:]
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "data.batch_size=4" in errors[0] and "--no-resume" in errors[0]
    layout = json.loads((out / "checkpoints" / "step_00000002" / "layout.json").read_text())
    assert layout["step"] == 2 and layout["world_size"] == 1
    assert "batch_size: 4" in (out / "config.yaml").read_text()  # the refused launch did not overwrite it


def test_signals_save_on_demand_and_stop_cleanly(shards, tmp_path):
    """SIGUSR1: checkpoint at the next step and go on (logged); SIGTERM (Slurm's time limit): save and
    stop with exit code 3, so that a scheduler can tell the stop from a finished run."""
    out = tmp_path / "run"
    metrics = out / "metrics.jsonl"
    proc = subprocess.Popen([python()] + _args(shards, out, "train.ep_size=1", "data.workers=0",
                                               "train.steps=100000", "train.warmup_steps=0"),
                            env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=Path(__file__).parents[2])

    def logged_steps() -> int:
        return len(metrics.read_text().splitlines()) if metrics.is_file() else 0

    def wait_for(condition, what: str) -> None:
        deadline = time.monotonic() + 120
        while not condition():
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.2)

    try:
        wait_for(lambda: logged_steps() >= 2, "training to start")
        os.kill(proc.pid, signal.SIGUSR1)
        wait_for(lambda: (out / "checkpoints" / "latest").is_file(), "the on-demand checkpoint")
        first = (out / "checkpoints" / "latest").read_text()
        wait_for(lambda: logged_steps() >= int(first.split("_")[1]) + 2, "training to go on")
        os.kill(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 3, output[-3000:]
    assert f"step {first.split('_')[1].lstrip('0')}: checkpoint " in output and "(SIGUSR1: saved, going on)" in output
    assert "stopped by SIGTERM or Ctrl-C, exit code 3" in output
    last = (out / "checkpoints" / "latest").read_text()
    assert int(last.split("_")[1]) > int(first.split("_")[1])
    assert int(last.split("_")[1]) == logged_steps(), "the stop checkpoint is the last step taken"
