"""Shard-time downscaling (make_shards --resize): the loader reads downscaled shards into the same
batches as it makes from full-size shards by resizing itself, up to the re-encoding's rounding."""

import tarfile

import pytest
import torch

from data_tools import make_shards
from data_tools.downscale import RECIPE
from data_tools.mini_taskonomy import generate
from modsquad_ds.data.decode import DEPTH_UNITS_PER_METRE, IMAGENET_STD
from modsquad_ds.data.loader import build_shard_loader
from modsquad_ds.data.shard_index import load_index

from data_helpers import cfg_for

STORED, SIZE = 64, 32  # the tiny preset's input size


@pytest.fixture(scope="module")
def full_and_small(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini64")
    generate(root, buildings=1, points=2, views=4, resolution=STORED, seed=1, workers=2, progress=False)
    out = {"root": root}
    for name, extra in (("full", []), ("small", ["--resize", str(SIZE)])):
        out[name] = tmp_path_factory.mktemp(f"shards_{name}")
        assert make_shards.main(["--root", str(root), "--out", str(out[name]), "--split", "train",
                                 "--samples-per-shard", "8", "--workers", "1", "--no-progress", *extra]) == 0
    return out


def _batches(shards_dir):
    cfg = cfg_for(shards_dir, batch_size=4, workers=0, hflip=False)
    assert cfg.model.img_size == SIZE
    return list(build_shard_loader(cfg, "train", 0, 1, 0, train=False))


def test_index_records_the_resize_and_files_keep_release_encodings(full_and_small):
    index = load_index(full_and_small["small"] / "train.index.json")
    assert (index.resolution, index.resize) == (SIZE, RECIPE)
    assert load_index(full_and_small["full"] / "train.index.json").resolution is None
    from data_tools.verify_shards import main as verify

    assert verify(["--index", str(full_and_small["small"] / "train.index.json"), "--decode"]) == 0


def test_downscaled_shards_give_the_loaders_own_resize(full_and_small):
    full, small = _batches(full_and_small["full"]), _batches(full_and_small["small"])
    assert [b["keys"] for b in full] == [b["keys"] for b in small] and len(full) == 2
    for a, b in zip(full, small):
        # rgb: bilinear before or after the ImageNet normalisation is the same map, up to 8-bit rounding
        assert (a["image"] - b["image"]).abs().max() <= 0.6 / 255 / IMAGENET_STD.min() + 1e-4
        assert a["masks"].keys() == b["masks"].keys()
        for task, m in a["masks"].items():
            assert torch.equal(m, b["masks"][task]), task  # masks from the raw values, both ways
        for task, t in a["targets"].items():
            u = b["targets"][task]
            m = a["masks"].get(task)
            sel = m.expand_as(t) if (m is not None and t.dim() == 4) else torch.ones_like(t, dtype=torch.bool)
            if task in ("segment_unsup2d", "segment_unsup25d", "segment_semantic"):
                assert torch.equal(t, u), task  # nearest on ids: exact
                continue
            if task.startswith("class_"):
                assert torch.equal(t, u), task
                continue
            tol = {"depth_zbuffer": 0.51 / DEPTH_UNITS_PER_METRE, "depth_euclidean": 0.51 / DEPTH_UNITS_PER_METRE,
                   "normal": 0.02, "principal_curvature": 0.6 / 127, "reshading": 0.6 / 255}.get(task, 0.6 / 65535)
            err = (t - u)[sel].abs().max().item()
            assert err <= tol, (task, err, tol)
        n = b["targets"]["normal"].permute(1, 0, 2, 3).reshape(3, -1)
        valid = b["masks"]["normal"].reshape(-1)
        assert torch.allclose(n[:, valid].norm(dim=0), torch.ones(int(valid.sum())), atol=1e-5)


def test_training_refuses_shards_downscaled_to_another_size(full_and_small):
    cfg = cfg_for(full_and_small["small"], batch_size=4, workers=0)
    cfg.model.img_size = 64
    with pytest.raises(ValueError, match=r"^model\.img_size: \(64\) differs from the 32 px the shards in .*: "
                                         r"reshard with --resize 64 or without --resize$"):
        build_shard_loader(cfg, "train", 0, 1, 0)
    # and before any process starts, in one line naming the setting
    from modsquad_ds.config import ConfigError
    from modsquad_ds.train.preflight import check_shards

    with pytest.raises(ConfigError, match=r"^model\.img_size: \(64\) differs from the 32 px the shards"):
        check_shards(cfg, world_size=1)


def test_resize_never_enlarges(full_and_small):
    """A sample smaller than the size is left out by the writer (make_shards refuses a whole release
    that is, up front: tests/data/test_make_shards_refusals.py)."""
    from data_tools.downscale import downscale_sample
    from modsquad_ds.data.decode import DecodeError

    with tarfile.open(full_and_small["small"] / "train-000000.tar") as tf:  # its first sample, downscaled
        members = [(m.name.split("."), m) for m in tf]
        files = {domain: tf.extractfile(m).read() for (key, domain, _), m in members if key == members[0][0][0]}
    with pytest.raises(DecodeError, match=f"is {SIZE}x{SIZE}, smaller than --resize {STORED}"):
        downscale_sample(files, STORED)
    assert downscale_sample(files, SIZE) == files  # already that size: the same bytes, not re-encoded


def test_shard_size_estimate_counts_downscaled_bytes(full_and_small):
    """--shard-size-mb with --resize sizes shards from downscaled bytes, not the source files'."""
    import tarfile

    from data_tools.sharding import make_plan

    def member_bytes(folder):
        with tarfile.open(folder / "train-000000.tar") as tf:
            return sum(m.size for m in tf if m.isfile()) / 8

    ratio = member_bytes(full_and_small["full"]) / member_bytes(full_and_small["small"])
    assert ratio > 1.5
    root, domains, target = full_and_small["root"], make_shards.DEFAULT_DOMAINS, 200_000
    resized = make_plan(root, root / "unused", "train", domains, None, 0, None, target, resize=SIZE)
    copied = make_plan(root, root / "unused", "train", domains, None, 0, None, target)
    assert resized.samples_per_shard == pytest.approx(copied.samples_per_shard * ratio, rel=0.15)
