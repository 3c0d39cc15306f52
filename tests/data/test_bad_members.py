"""Every member of a sample alike: an image or label of the wrong size is skipped and counted with
its shard named (it used to crash the run inside numpy); a shard listed in the index but gone is an
error, never a silent skip."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from data_helpers import cfg_for, collect, copy_shards, rewrite_index, rewrite_tar
from modsquad_ds.data.corrupt import CorruptDataError
from modsquad_ds.data.loader import build_train_loader
from modsquad_ds.data.tar_reader import read_span


def _shrunk(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as img:
        out = io.BytesIO()
        img.resize((img.width // 2, img.height // 2)).save(out, format="PNG")
        return out.getvalue()


# a depth-masked label, the mask's source, a 16-bit map, a nearest-resized label, the input image
MEMBERS = ["normal", "depth_zbuffer", "edge_texture", "segment_unsup2d", "rgb"]


def test_wrong_size_members_are_skipped_and_counted_per_shard(all_shards, tmp_path):
    out = copy_shards(all_shards, tmp_path / "sizes")
    for i, domain in enumerate(MEMBERS):
        done = []

        def shrink_first(name, data, domain=domain, done=done):
            if name.endswith(f".{domain}.png") and not done:
                done.append(name)
                return [(name, _shrunk(data))]
            return [(name, data)]

        rewrite_tar(out / f"train-{i:06d}.tar", shrink_first)
    rewrite_index(out)
    loader = build_train_loader(cfg_for(out, batch_size=2, workers=2, shuffle_buffer=4), 0, 1, epoch=0)
    batches = collect(loader)
    assert len(batches) == 15
    report = loader.corrupt_report()
    assert report == {f"train-{i:06d}.tar": {"shape mismatch": 1} for i in range(len(MEMBERS))}


def test_a_listed_shard_that_is_gone_is_an_error(all_shards, tmp_path):
    out = copy_shards(all_shards, tmp_path / "gone")
    (out / "train-000001.tar").unlink()
    with pytest.raises(CorruptDataError, match=r"shard train-000001\.tar is listed in the index but missing"):
        list(read_span(str(out / "train-000001.tar"), "train-000001.tar", 0, 7, {"rgb"}))
    with pytest.raises(CorruptDataError, match=r"train-000001\.tar is listed in the index but missing"):
        collect(build_train_loader(cfg_for(out, batch_size=2, workers=0), 0, 1, epoch=0))
