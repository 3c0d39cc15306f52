"""Progress where the output goes: plain lines in a log file (a Slurm job's output), not a
live bar's carriage returns; metrics and TensorBoard whatever the progress setting."""

import json

import pytest

from modsquad_ds.train.logger import RunLogger


def _run(tmp_path, steps=20, log_every=5, **kwargs):
    logger = RunLogger(tmp_path, total_steps=steps, start_step=0, enabled=True, **kwargs)
    for step in range(1, steps + 1):
        scalars = ({"loss/total": 1.0 / step, "perf/images_per_s": 7.0, "lr": 1e-3}
                   if step % log_every == 0 else None)
        logger.step(step, scalars)
    logger.close()


def test_into_a_file_progress_is_one_plain_line_per_logged_step(tmp_path, capsys):
    _run(tmp_path, interactive=False, line_every_s=0)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert [line.split(",")[0] for line in lines] == [f"train: step {s}/20 ({5 * s}.0%)" for s in (5, 10, 15, 20)]
    assert lines[1].startswith("train: step 10/20 (50.0%), loss 0.1000, 7.0 images/s, lr 0.001, ")
    assert lines[-1].endswith("00:00:00 left")
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]


def test_lines_are_throttled_but_the_first_and_last_always_come(tmp_path, capsys):
    _run(tmp_path, interactive=False, line_every_s=3600)
    assert [line.split(",")[0] for line in capsys.readouterr().err.splitlines()] == [
        "train: step 5/20 (25.0%)", "train: step 20/20 (100.0%)"]


@pytest.mark.parametrize("interactive", [False, True])
def test_no_progress_writes_nothing_but_keeps_the_metrics(tmp_path, capsys, interactive):
    _run(tmp_path, progress=False, interactive=interactive)
    assert capsys.readouterr().err == ""
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4


def test_a_loop_into_a_file_reports_in_lines_and_yields_every_item(capsys):
    from modsquad_ds.progress import track

    assert list(track(range(10), desc="eval test", total=10, unit="batch", interactive=False, every_s=3600)) == list(range(10))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("eval test: 10/10 batch (100.0%), ") and lines[0].endswith(" left")
    assert list(track(range(4), desc="predict", interactive=False, every_s=0)) == [0, 1, 2, 3]
    assert [line.split(",")[0] for line in capsys.readouterr().err.splitlines()] == [f"predict: {n} it" for n in (1, 2, 3, 4)]
    items = [1, 2]
    assert track(items, desc="x", enabled=False) is items and capsys.readouterr().err == ""


def test_time_left_by_hand():
    from modsquad_ds.progress import time_left

    assert time_left(0, 3, 5.0) == "?"
    assert time_left(1, 3, 10.0) == "00:00:20"           # 10 s per item, 2 to go
    assert time_left(1, 3, 50_000.0) == "1d 03:46:40"    # 100,000 s
    assert time_left(3, 3, 7.0) == "00:00:00"
