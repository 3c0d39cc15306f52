"""``python -m modsquad_ds.evaluate`` on a real trained checkpoint: 2 ranks with expert parallelism 2
give the numbers of 1 process (metrics and usage sums, every sample once, padding excluded); a
missing or corrupt checkpoint gives one clear line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from _launch import BIN, mini_shards, python, run, run_ok

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 2-step Mod-Squad run on 4 buildings x 3 points x 3 views at 32 px (test split: 9 views)."""
    root = tmp_path_factory.mktemp("eval_mini")
    shards = mini_shards(root, points=3, views=3, seed=2, samples_per_shard=5, splits=("train", "test"))
    run_dir = root / "run"
    run_ok([python(), "-m", "modsquad_ds.train", "--config", "configs/demo.yaml", "--set", f"data.shards_dir={shards}",
            "--set", "data.batch_size=4", "--set", "data.workers=0", "--set", "train.steps=2",
            "--set", "train.warmup_steps=0", "--set", f"train.out_dir={run_dir}"], timeout_s=240)
    return run_dir


def _eval(cmd_prefix, run_dir: Path, *extra: str) -> dict:
    # the folder positionally: torchrun would take --run for its own --run-path
    out = run_ok([*cmd_prefix, "-m", "modsquad_ds.evaluate", str(run_dir), "--split", "test",
                  "--set", "data.batch_size=4", "--set", "data.workers=0", *extra], timeout_s=240)
    path = run_dir / "eval" / "test_step_00000002.json"
    assert "results:" in out.output, out.output[-2000:]
    return json.loads(path.read_text())


def _close(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and path.endswith("/mi"):
        # A layer's MI is a difference of entropies near log E (2.8 nats at 16 experts) of router
        # probabilities that one process and 2 expert-parallel ranks round differently in float32:
        # its error is on the entropies' scale, not relative to the small difference (seen: 7e-9
        # nats apart on an MI of 0.003, with every usage sum within 1e-6 relative).
        assert a == pytest.approx(b, rel=1e-6, abs=1e-6), path
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9), path
    else:
        assert a == b, path


def test_two_ranks_expert_parallel_equal_one_process(trained):
    one = _eval([python()], trained, "--set", "data.workers=2")  # batches from workers, packed (data/packed.py)
    assert one["samples"] == 9  # every test view once: 9 = 5 + 4 on two ranks, padded to 2 batches of 4 each
    two = _eval([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2"], trained, "--set", "train.ep_size=2")
    assert two["samples"] == 9
    _close(one["tasks"], two["tasks"])
    _close(one["usage"], two["usage"])
    assert (trained / "eval" / "test_step_00000002.md").is_file()
    assert (trained / "eval" / "test_step_00000002_similarity.png").stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = {}
    for events in (trained / "tensorboard").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events)).Reload()
        tags.update({k: acc.Tags()[k] for k in ("scalars", "images")} if not tags else
                    {k: tags[k] + acc.Tags()[k] for k in ("scalars", "images")})
    assert "eval_test/depth_zbuffer/rmse" in tags["scalars"]
    assert {"eval_test/usage", "eval_test/similarity"} <= set(tags["images"])


def test_max_samples_evaluates_the_first_n_apart_from_the_whole_split(trained):
    """``--max-samples 5`` evaluates the split's first 5 samples, the same 5 on any number of ranks, and
    writes them as ``test_first5_*``: the whole split's results (which a study takes as done) and its
    TensorBoard curves are neither overwritten nor joined by the partial numbers."""
    whole = trained / "eval" / "test_step_00000002.json"
    before = whole.read_bytes() if whole.is_file() else None
    out = run_ok([python(), "-m", "modsquad_ds.evaluate", str(trained), "--split", "test", "--max-samples", "5",
                  "--set", "data.batch_size=4", "--set", "data.workers=0"], timeout_s=240)
    part = trained / "eval" / "test_first5_step_00000002.json"
    assert f"results: {part}" in out.output, out.output[-2000:]
    one = json.loads(part.read_text())
    assert (one["split"], one["first"], one["samples"]) == ("test", 5, 5)
    assert (whole.read_bytes() if whole.is_file() else None) == before
    assert "only the split's first 5 samples" in part.with_suffix(".md").read_text()
    run_ok([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "modsquad_ds.evaluate", str(trained),
            "--split", "test", "--max-samples", "5", "--set", "data.batch_size=4", "--set", "data.workers=0",
            "--set", "train.ep_size=2"], timeout_s=240)
    two = json.loads(part.read_text())
    assert two["samples"] == 5
    _close(one["tasks"], two["tasks"])
    _close(one["usage"], two["usage"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = set()
    for events in (trained / "tensorboard").glob("events.out.tfevents.*"):
        scalars |= set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    assert "eval_test_first5/depth_zbuffer/rmse" in scalars


def _error_line(run_dir: Path, split: str = "test") -> str:
    res = run([python(), "-m", "modsquad_ds.evaluate", "--run", str(run_dir), "--split", split], timeout_s=120)
    assert res.returncode == 2, res.output[-2000:]
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.output, res.output[-2000:]
    return errors[0]


def test_missing_and_corrupt_checkpoint_one_line(trained, tmp_path):
    broken = tmp_path / "run"
    shutil.copytree(trained, broken)
    ckpt = broken / "checkpoints" / "step_00000002"
    model_file = ckpt / "mp_rank_00_model_states.pt"
    data = model_file.read_bytes()
    model_file.write_bytes(data[: len(data) // 2])
    assert "is corrupt" in _error_line(broken)
    shutil.rmtree(broken / "checkpoints")
    assert "no complete checkpoint" in _error_line(broken)


def test_split_without_shards_one_line(trained):
    line = _error_line(trained, "val")  # the fixture wrote train and test shards only
    assert line.startswith("error: --split:") and "no val.index.json" in line and "make_shards --split val" in line


def test_ctrl_c_during_evaluation_ends_with_one_line_and_its_workers(trained, tmp_path):
    """Ctrl-C as a terminal sends it (every process of the foreground group) while the evaluation
    reads its batches from workers: one line, exit 130, no traceback, no result written, and no
    worker left behind (they ignore Ctrl-C and end with the rank). The rank is frozen once its
    workers exist, so that the signal lands inside the evaluation loop."""
    import os
    import signal
    import subprocess
    import time

    import psutil

    from _launch import REPO, base_env

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir, ignore=shutil.ignore_patterns("eval"))
    proc = subprocess.Popen([python(), "-m", "modsquad_ds.evaluate", str(run_dir), "--split", "test", "--set",
                             "data.batch_size=2", "--set", "data.workers=2"], cwd=REPO, env=base_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    rank, workers = psutil.Process(proc.pid), []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate(timeout=30)[0][-3000:]
            workers = rank.children()
            time.sleep(0.002)
        rank.suspend()
        time.sleep(0.5)  # the workers have just forked: let them reach their loop
        os.killpg(proc.pid, signal.SIGINT)
        rank.resume()
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, output[-3000:]
    assert output.strip().splitlines()[-1] == "interrupted (Ctrl-C)" and "Traceback" not in output, output[-3000:]
    assert not (run_dir / "eval").exists()

    def alive(worker) -> bool:
        try:
            return worker.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 10
    while any(alive(w) for w in workers):
        assert time.monotonic() < deadline, "a worker outlived the evaluation"
        time.sleep(0.05)
