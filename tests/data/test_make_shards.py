"""The sharding tools on a real mini release: layout, byte-for-byte copies, resume, job ranges,
index and verification."""

import io
import json
import os
import signal
import tarfile
from pathlib import Path

import pytest

from data_tools import make_shards, verify_shards
from data_tools.sharding import make_plan
from modsquad_ds.data.layout import SampleId, read_split_csv, scan_release
from modsquad_ds.data.shard_index import load_index

from data_helpers import copy_shards


def _members(tar_path):
    with tarfile.open(tar_path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}


def test_split_csv_with_bare_cr_lines(mini_root):
    csv = mini_root / "splits" / "train_val_test_mini.csv"
    assert b"\r" in csv.read_bytes() and b"\n" not in csv.read_bytes()
    splits = read_split_csv(csv)
    assert len(splits["train"]) == 3 and len(splits["val"]) == 1 and len(splits["test"]) == 1


def test_shards_copy_files_byte_for_byte_one_sample_per_key(all_shards, mini_root):
    index = load_index(all_shards / "train.index.json")
    assert [s.samples for s in index.shards] == [7, 7, 7, 7, 2]
    keys = []
    for shard in index.shards:
        members = _members(shard.path)
        shard_keys = list(dict.fromkeys(n.split(".")[0] for n in members))
        keys += shard_keys
        for name, data in members.items():
            key, domain, _ = name.split(".")
            assert data == SampleId.from_key(key).path(mini_root, domain).read_bytes()
    assert len(keys) == len(set(keys)) == 30
    # shuffled across buildings: the first shard is not one building
    assert len({SampleId.from_key(k).building for k in keys[:7]}) > 1


def test_index_records_sizes_and_checksums_and_verify_passes(all_shards):
    index = load_index(all_shards / "train.index.json")
    for s in index.shards:
        assert Path(s.path).stat().st_size == s.bytes and len(s.sha256) == 64
    assert verify_shards.verify(all_shards / "train.index.json", decode=True, progress=False) == []


def test_verify_detects_tampering(all_shards, tmp_path):
    out = copy_shards(all_shards, tmp_path / "s")
    victim = out / "train-000001.tar"
    data = bytearray(victim.read_bytes())
    data[3000] ^= 0xFF
    victim.write_bytes(bytes(data))
    (out / "train-000003.tar").write_bytes((out / "train-000003.tar").read_bytes()[:5000])
    problems = verify_shards.verify(out / "train.index.json", progress=False)
    assert any("train-000001.tar: sha256" in p for p in problems)
    assert any("train-000003.tar" in p and "size" in p for p in problems)
    assert verify_shards.main(["--index", str(out / "train.index.json"), "--no-progress"]) == 1


def test_resume_skips_finished_shards_and_jobs_partition_the_work(mini_root, all_shards, tmp_path):
    out = tmp_path / "jobs"
    args = ["--root", str(mini_root), "--out", str(out), "--samples-per-shard", "7", "--workers", "1",
            "--no-progress", "--num-jobs", "3"]
    assert make_shards.main(args + ["--job-index", "0"]) == 0
    assert not (out / "train.index.json").exists()  # other jobs' shards are missing
    first = out / "train-000000.tar"
    stamp = first.stat().st_mtime_ns
    os.utime(first, ns=(stamp - 10**9, stamp - 10**9))  # make any rewrite visible
    stamp = first.stat().st_mtime_ns
    assert make_shards.main(args + ["--job-index", "2"]) == 0
    assert make_shards.main(args + ["--job-index", "1"]) == 0  # the last job writes the index
    assert first.stat().st_mtime_ns == stamp
    # deterministic: three jobs write byte-identical shards and index to one job's
    a = json.loads((out / "train.index.json").read_text())["shards"]
    b = json.loads((all_shards / "train.index.json").read_text())["shards"]
    assert a == b


def test_a_killed_runs_half_shards_are_removed_when_it_resumes(mini_root, tmp_path, capsys):
    out = tmp_path / "interrupted"
    out.mkdir()
    (out / ".train-000000.tar.123.tmp").write_bytes(b"half written")  # a SIGKILLed writer's leftovers
    (out / ".train-000001.tar.123.json").write_text("{")
    args = ["--root", str(mini_root), "--out", str(out), "--samples-per-shard", "10", "--workers", "1",
            "--no-progress"]
    assert make_shards.main(args) == 0
    assert "removed 2 unfinished files of an earlier run" in capsys.readouterr().out
    assert len(load_index(out / "train.index.json").shards) == 3
    assert not list(out.glob(".*"))


FIVE_SHARDS = [f"train-{i:06d}.tar" for i in range(5)]  # the mini release's 30 views in shards of 7


def _five_shards_args(mini_root, out) -> list[str]:
    return ["--root", str(mini_root), "--out", str(out), "--samples-per-shard", "7", "--workers", "1",
            "--no-progress"]


def _stopping_at(out, name, stop):
    """make_shards' write_shard, except that at shard ``name`` it leaves a half-written file, as a
    writer stopped mid-shard would, and calls ``stop`` (raises, or sends a signal)."""
    write = make_shards.write_shard

    def write_or_stop(job):
        if job.name == name:
            (out / f".{job.name}.{os.getpid()}.tmp").write_bytes(b"half written")
            stop()
        return write(job)
    return write_or_stop


def _ctrl_c():
    raise KeyboardInterrupt


def test_ctrl_c_reports_the_shards_written_and_removes_the_half_written_one(mini_root, tmp_path, monkeypatch,
                                                                             capsys):
    """Ctrl-C while the third of five shards is being written, with the progress bar off (whose count
    stays 0): the message counts the two finished shards, the third's file is removed, and the
    same command then finishes the run."""
    out = tmp_path / "ctrl_c"
    args = _five_shards_args(mini_root, out)
    write = make_shards.write_shard
    monkeypatch.setattr(make_shards, "write_shard", _stopping_at(out, FIVE_SHARDS[2], _ctrl_c))
    assert make_shards.main(args) == 130
    assert "interrupted: 2 of 5 shards written, 1 unfinished files removed" in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("*.tar")) == FIVE_SHARDS[:2]
    assert not list(out.glob(".*"))
    monkeypatch.setattr(make_shards, "write_shard", write)
    assert make_shards.main(args) == 0
    assert len(load_index(out / "train.index.json").shards) == 5


def test_summary_reports_missing_unreadable_and_excluded(mini_root, tmp_path):
    import shutil

    root = tmp_path / "damaged"
    shutil.copytree(mini_root, root)
    sid = SampleId("minibldg000", 0, 0)
    sid.path(root, "normal").unlink()  # missing domain file
    SampleId("minibldg000", 1, 0).path(root, "rgb").write_bytes(b"not a png")  # unreadable
    out = tmp_path / "out"
    assert make_shards.main(["--root", str(root), "--out", str(out), "--split-csv",
                             str(root / "splits" / "train_val_test_mini.csv"), "--split", "train",
                             "--samples-per-shard", "4", "--workers", "1", "--no-progress"]) == 0
    summary = load_index(out / "train.index.json").summary
    assert summary["incomplete_samples"] == 1 and summary["missing_files_per_domain"] == {"normal": 1}
    assert summary["incomplete_examples"] == [sid.key]
    assert summary["excluded_buildings"] == 2  # val and test buildings are not in this split
    assert summary["unreadable_samples"] == 1
    assert "minibldg000__point_1_view_0" in summary["unreadable_examples"][0]["key"]
    assert load_index(out / "train.index.json").num_samples == 18 - 2


def test_pairing_is_by_name_not_listing_position(mini_root, tmp_path):
    import shutil

    root = tmp_path / "r"
    shutil.copytree(mini_root / "rgb", root / "rgb")
    shutil.copytree(mini_root / "normal", root / "normal")
    (root / "normal" / "taskonomy" / "minibldg001" / "point_0_view_0_domain_normal.png").unlink()
    scan = scan_release(root, ["rgb", "normal"])
    for sid, files in scan.samples.items():
        assert files["normal"].name == f"point_{sid.point}_view_{sid.view}_domain_normal.png"
        assert files["rgb"].parent.name == files["normal"].parent.name == sid.building
    assert list(scan.incomplete) == [SampleId("minibldg001", 0, 0)]


def test_plan_is_deterministic_in_seed(mini_root, tmp_path):
    a = make_plan(mini_root, tmp_path, "train", ["rgb"], None, seed=1, samples_per_shard=5)
    b = make_plan(mini_root, tmp_path, "train", ["rgb"], None, seed=1, samples_per_shard=5)
    c = make_plan(mini_root, tmp_path, "train", ["rgb"], None, seed=2, samples_per_shard=5)
    assert a.plan_hash == b.plan_hash != c.plan_hash


def test_sigterm_stops_like_ctrl_c_with_exit_143(mini_root, tmp_path, capsys):
    """Slurm's scancel and time limit send SIGTERM: a real one, while the second of five shards is
    being written, ends the run with one line, its half shard removed, exit 128 + 15; the handler
    is put back; the same command then finishes the run."""
    out = tmp_path / "sigterm"
    args = _five_shards_args(mini_root, out)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(make_shards, "write_shard",
                   _stopping_at(out, FIVE_SHARDS[1], lambda: os.kill(os.getpid(), signal.SIGTERM)))
        assert make_shards.main(args) == 143
    assert signal.getsignal(signal.SIGTERM) is before
    assert "stopped by SIGTERM: 1 of 5 shards written, 1 unfinished files removed" in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("*.tar")) == FIVE_SHARDS[:1]
    assert not list(out.glob(".*"))
    assert make_shards.main(args) == 0
    assert len(load_index(out / "train.index.json").shards) == 5


def test_verify_names_scattered_members_wrong_counts_and_missing_domains(all_shards, tmp_path):
    """A tar rewritten by hand: one sample's members split apart, one domain file of another sample
    dropped; the index claims one sample more than the tar holds. Each is one line naming the shard."""
    from modsquad_ds.data.shard_index import ShardInfo

    index = load_index(all_shards / "train.index.json")
    with tarfile.open(index.shards[0].path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf if m.isfile()]
    keys = list(dict.fromkeys(m.name.split(".")[0] for m, _ in members))
    first = [x for x in members if x[0].name.startswith(keys[0] + ".")]
    dropped = [x for x in members if x[0].name.startswith(keys[1] + ".")][0]
    rest = [x for x in members if x not in first and x is not dropped]
    tar = tmp_path / "train-000000.tar"
    with tarfile.open(tar, "w") as out:
        for member, data in first[:1] + rest + first[1:]:  # the first sample's other files at the end
            out.addfile(member, io.BytesIO(data))
    problems = verify_shards.check_shard((ShardInfo(tar.name, 8, path=str(tar)), index.domains, False))
    lost = dropped[0].name.split(".")[1]
    assert problems == [f"train-000000.tar: members of {keys[0]} are not consecutive",
                        "train-000000.tar: 7 samples, index says 8",
                        f"train-000000.tar: {keys[1]} lacks {lost}"]
