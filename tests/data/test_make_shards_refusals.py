"""make_shards on bad options and bad files: options that cannot work are refused with one line
before anything is written (exit 2); a file that breaks the release encodings leaves its sample
out, listed; a job whose every sample was left out fails instead of writing an empty split."""

import json
import os
import shutil

import pytest
from PIL import Image

from data_tools import make_shards, verify_shards
from modsquad_ds.data.layout import SampleId
from modsquad_ds.data.shard_index import load_index


def _args(root, out, *extra) -> list[str]:
    return ["--root", str(root), "--out", str(out), "--split", "train", "--samples-per-shard", "10",
            "--workers", "1", "--no-progress", *extra]


def _error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1]


def _nothing_written(out) -> bool:
    return not list(out.glob("*.tar")) and not (out / "train.index.json").exists()


def test_resize_refusals_name_the_problem(mini_root, tmp_path, capsys):
    out = tmp_path / "up"
    assert make_shards.main(_args(mini_root, out, "--resize", "32")) == 2
    assert _error_line(capsys).endswith("maps are 24x24, and shards never upsample")
    assert _nothing_written(out)
    with pytest.raises(SystemExit) as stop:  # normal maps are averaged over depth's valid pixels
        make_shards.main(_args(mini_root, out, "--resize", "16", "--domains", "rgb", "normal"))
    assert stop.value.code == 2 and "add depth_zbuffer to --domains" in _error_line(capsys)
    assert _nothing_written(out)


def test_a_file_in_another_encoding_leaves_its_sample_out_under_resize(mini_root, tmp_path):
    root = tmp_path / "release"
    shutil.copytree(mini_root, root)
    grey = SampleId("minibldg000", 0, 0).path(root, "rgb")
    Image.open(grey).convert("L").save(grey)  # decodes fine, but is not the release's RGB
    out = tmp_path / "out"
    assert make_shards.main(_args(root, out, "--resize", "16")) == 0
    summary = load_index(out / "train.index.json").summary
    assert summary["unreadable_samples"] == 1
    assert summary["unreadable_examples"] == [
        {"key": "minibldg000__point_0_view_0", "reason": "cannot downscale: rgb: uint8 (24, 24), release is uint8 RGB"}]
    assert load_index(out / "train.index.json").num_samples == 29


def test_a_job_whose_every_sample_is_left_out_fails(mini_root, tmp_path, capsys):
    root = tmp_path / "release"
    shutil.copytree(mini_root, root, ignore=shutil.ignore_patterns("*.png"))
    for domain in ("rgb", "depth_zbuffer"):
        shutil.copytree(mini_root / domain, root / domain, dirs_exist_ok=True)
    for png in (root / "rgb").rglob("*.png"):
        Image.open(png).convert("L").save(png)
    out = tmp_path / "out"
    assert make_shards.main(_args(root, out, "--resize", "16", "--domains", "rgb", "depth_zbuffer")) == 1
    assert "every sample of these shards was left out; the first:" in _error_line(capsys)
    assert not (out / "train.index.json").exists()


def test_resuming_with_other_options_is_refused_before_mixing_two_plans(mini_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert make_shards.main(_args(mini_root, out, "--num-jobs", "2")) == 0  # 2 of 3 shards of 10
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    capsys.readouterr()
    for other in (["--seed", "1"], ["--domains", "rgb", "normal"]):
        assert make_shards.main(_args(mini_root, out, "--num-jobs", "2", "--job-index", "1", *other)) == 2
        assert "were written with other options" in _error_line(capsys)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == written
    assert make_shards.main(_args(mini_root, out, "--num-jobs", "2", "--job-index", "1")) == 0


def test_index_only_fails_while_shards_are_missing(mini_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert make_shards.main(_args(mini_root, out, "--num-jobs", "3")) == 0  # shard 0 of 3
    assert make_shards.main(_args(mini_root, out, "--index-only")) == 2
    assert "--index-only: 2 shards are not written yet (train-000001.tar, train-000002.tar)" in _error_line(capsys)
    assert not (out / "train.index.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--shard-range", "5"], "'5' must look like START:END"),
    (["--shard-size-mb", "0"], "--shard-size-mb must be > 0"),
    (["--workers", "0"], "--workers must be >= 1"),
])
def test_bad_arguments_get_one_line(mini_root, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        make_shards.main(["--root", str(mini_root), "--out", str(tmp_path / "out"), *argv])
    assert stop.value.code == 2 and message in _error_line(capsys)


def test_an_output_path_through_a_file_gets_one_line(mini_root, tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit):
        make_shards.main(_args(mini_root, tmp_path / "afile" / "out"))
    assert "cannot create the folder (Not a directory)" in _error_line(capsys)


def test_verify_flags_an_index_without_samples_and_a_malformed_one(all_shards, tmp_path, capsys):
    index = json.loads((all_shards / "train.index.json").read_text())
    empty = tmp_path / "empty.index.json"
    empty.write_text(json.dumps(dict(index, shards=[])))
    assert verify_shards.main(["--index", str(empty), "--no-progress"]) == 1
    assert "the index lists no samples" in capsys.readouterr().out
    for broken in ([1, 2], dict(index, shards=[{"name": "train-000000.tar"}]), dict(index, version=2)):
        bad = tmp_path / "bad.index.json"
        bad.write_text(json.dumps(broken))
        assert verify_shards.main(["--index", str(bad), "--no-progress"]) == 1
        assert _error_line(capsys).startswith(f"error: {bad}: ")
    with pytest.raises(ValueError, match=r"index version 2 is not supported \(expected 1\)"):
        load_index(bad)  # the last one: a newer format, not read as if it were this one


@pytest.mark.parametrize("workers", [1, 2])
def test_a_writer_that_fails_ends_the_run_with_one_line_and_no_half_shards(mini_root, tmp_path, capsys,
                                                                          monkeypatch, workers):
    """A full disk (or any writer failure) in this process or in a forked writer: exit 1, the shard
    and the error named, the unfinished files removed; the same command then resumes."""
    import errno

    out = tmp_path / "out"
    write = make_shards.write_shard

    def full_disk_at_the_second(job):
        if job.name == "train-000001.tar":
            (out / f".{job.name}.{os.getpid()}.tmp").write_bytes(b"half written")
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(job)

    monkeypatch.setattr(make_shards, "write_shard", full_disk_at_the_second)
    args = ["--root", str(mini_root), "--out", str(out), "--split", "train", "--samples-per-shard", "10",
            "--workers", str(workers), "--no-progress"]
    assert make_shards.main(args) == 1
    line = _error_line(capsys)
    assert "No space left on device" in line and "unfinished files removed; rerun to resume" in line
    if workers > 1:
        assert "writing train-000001.tar failed" in line
    assert not list(out.glob(".*"))
    monkeypatch.setattr(make_shards, "write_shard", write)
    assert make_shards.main(args) == 0
