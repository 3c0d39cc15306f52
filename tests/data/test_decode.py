"""Release encodings -> numbers, on hand-made arrays with hand-computed answers."""

import io
import pickle

import numpy as np
import pytest
import torch

from data_tools.release_io import encode_npy, encode_png
from modsquad_ds.data import decode
from modsquad_ds.data.classes import DEFAULT_OBJECT_KEEP, DEFAULT_SCENE_KEEP
from modsquad_ds.data.sample import SampleProcessor, needed_domains
from modsquad_ds.data.tasks import get_task


def test_png_16bit_round_trip_keeps_uint16():
    depth = np.array([[0, 512, 1024], [64499, 64500, 65535]], dtype=np.uint16)
    out = decode.decode_png(encode_png(depth))
    assert out.dtype == np.uint16 and np.array_equal(out, depth)


def test_depth_in_metres_and_mask_from_raw():
    raw = np.array([[512, 1024], [64499, 65535]], dtype=np.uint16)
    valid = decode.depth_valid(raw)
    target, mask = decode.to_target(get_task("depth_zbuffer"), raw, valid)
    assert target.shape == (1, 2, 2)
    assert target[0, 0, 0] == 1.0 and target[0, 0, 1] == 2.0  # 512 units = 1 m
    assert mask.tolist() == [[True, True], [True, False]]


def test_depth_64500_is_the_first_invalid_value():
    """The rule is depth_zbuffer >= 64500 means 'no geometry' (field notes; decode.DEPTH_INVALID_MIN):
    64499 is valid, 64500 and everything above it is not. Proven for both places the rule is applied:
    depth_valid (the mask every depth-masked task inherits) and each depth task's own mask, which
    to_target builds from its raw values (here with an all-valid z-buffer map, so only that own mask
    can mark anything invalid)."""
    raw = np.array([[64498, 64499], [64500, 64501], [65534, 65535]], dtype=np.uint16)
    expected = [[True, True], [False, False], [False, False]]
    assert decode.depth_valid(raw).tolist() == expected
    all_valid = np.ones(raw.shape, bool)
    for domain in ("depth_zbuffer", "depth_euclidean"):
        target, mask = decode.to_target(get_task(domain), raw, all_valid)
        assert mask.tolist() == expected, domain
        assert target[0, 1, 0] == np.float32(64500 / 512)  # the value is kept, only masked
    # a depth-masked task takes the z-buffer's boundary: a normal at a 64500 pixel is invalid
    normals = np.full((3, 2, 3), [128, 128, 255], np.uint8)
    _, nmask = decode.to_target(get_task("normal"), normals, decode.depth_valid(raw))
    assert nmask.tolist() == expected


def test_normals_decode_to_unit_vectors_and_invalid_code_masked():
    raw = np.array([[[255, 128, 128], [128, 1, 128], [128, 128, 128]]], dtype=np.uint8)  # +x, -y, invalid
    valid = np.ones((1, 3), bool)
    target, mask = decode.to_target(get_task("normal"), raw, valid)
    assert np.allclose(target[:, 0, 0], [1, 0, 0]) and np.allclose(target[:, 0, 1], [0, -1, 0])
    assert mask.tolist() == [[True, True, False]]
    assert np.allclose(np.linalg.norm(target[:, 0, :2], axis=0), 1.0)


def test_curvature_two_channels_centred_on_127_and_zero_code_invalid():
    raw = np.array([[[254, 127, 0], [0, 0, 0]]], dtype=np.uint8)
    target, mask = decode.to_target(get_task("principal_curvature"), raw, np.ones((1, 2), bool))
    assert target.shape == (2, 1, 2)
    assert target[0, 0, 0] == 1.0 and target[1, 0, 0] == 0.0
    assert mask.tolist() == [[True, False]]


def test_reshading_one_channel_and_uint16_maps_scaled_by_65535():
    rgb = np.full((2, 2, 3), 51, np.uint8)
    t, m = decode.to_target(get_task("reshading"), rgb, np.array([[True, False], [True, True]]))
    assert t.shape == (1, 2, 2) and np.allclose(t, 0.2) and m[0, 1] == False  # noqa: E712 - depth-masked
    e, m2 = decode.to_target(get_task("edge_texture"), np.array([[65535, 0]], np.uint16), None)
    assert e.tolist() == [[[1.0, 0.0]]] and m2 is None


def test_class_object_softmax_then_keep_and_renormalise():
    logits = np.zeros(1000, np.float32)
    logits[DEFAULT_OBJECT_KEEP[0]] = np.log(3.0)  # kept classes: one weighs 3, the 99 others 1
    probs = decode.class_probs(logits, DEFAULT_OBJECT_KEEP, 1000, "class_object")
    assert probs.shape == (100,) and probs.sum() == pytest.approx(1.0)
    assert probs[0] == pytest.approx(3 / 102) and probs[1] == pytest.approx(1 / 102)


def test_class_scene_distribution_is_kept_as_probabilities():
    p = np.zeros(365, np.float32)
    p[DEFAULT_SCENE_KEEP[2]] = 0.5
    p[DEFAULT_SCENE_KEEP[5]] = 0.25
    p[1] = 0.25  # not kept
    probs = decode.class_probs(p, DEFAULT_SCENE_KEEP, 365, "class_scene")
    assert probs[2] == pytest.approx(2 / 3) and probs[5] == pytest.approx(1 / 3)


@pytest.mark.parametrize("array", [
    np.full(365, 1 / 365, np.float32),                                # class_scene / class_object
    np.arange(12, dtype=np.int64).reshape(3, 4),
    np.asfortranarray(np.arange(24, dtype=np.float64).reshape(2, 3, 4)),  # fortran_order True
    np.array(7, np.uint8),                                            # 0-d
    np.array([1.5, -2.0], ">f4"),                                     # big-endian
    np.array([True, False]), np.zeros((0, 3), np.float16), np.array([1 + 2j], np.complex64)])
@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_npy_header_read_here_gives_what_np_load_gives(array, version):
    """decode_npy parses the header itself (numpy's np.load runs ast.literal_eval on it, which raised
    SystemError in forked workers under CPython 3.11 and counted valid samples as corrupt): the same
    array, dtype, shape and memory order as np.load, for every header format version."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, version=version)
    expected, got = np.load(io.BytesIO(buf.getvalue())), decode.decode_npy(buf.getvalue())
    assert got.dtype == expected.dtype and got.shape == expected.shape and np.array_equal(got, expected)
    assert got.flags.f_contiguous == expected.flags.f_contiguous and got.flags.writeable


def test_npy_that_is_not_a_plain_numeric_array_is_one_clear_error():
    buf = io.BytesIO()
    np.save(buf, np.arange(6, dtype=np.float32))
    good = buf.getvalue()
    cases = {"truncated": good[:-3], "bad magic": b"\x93NUMPX" + good[6:],
             "unknown version": good[:6] + b"\x09" + good[7:],
             "shape lies": good.replace(b"(6,)", b"(7,)"),
             "not numeric": good.replace(b"'<f4'", b"'<U1'")}
    structured = io.BytesIO()
    np.save(structured, np.zeros(2, dtype=[("a", "<f4"), ("b", "<i4")]))
    cases["structured"] = structured.getvalue()
    for name, data in cases.items():
        with pytest.raises(decode.DecodeError, match="NPY"):
            decode.decode_npy(data)


def test_npy_with_pickled_object_is_refused_not_executed(tmp_path):
    marker = tmp_path / "executed"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    buf = io.BytesIO()
    np.save(buf, np.array([Boom()], dtype=object), allow_pickle=True)
    with pytest.raises(decode.DecodeError):
        decode.decode_npy(buf.getvalue())
    with pytest.raises(decode.DecodeError):
        decode.decode_member("npy", pickle.dumps(Boom()))
    assert not marker.exists()


def test_semantic_ids_shift_and_zero_is_masked():
    raw = np.array([[0, 1, 17]], np.uint8)
    t, m = decode.to_target(get_task("segment_semantic"), raw, None)
    assert t.tolist() == [[0, 0, 16]] and m.tolist() == [[False, True, True]]


def test_processor_batch_contract_from_encoded_files():
    tasks = ["depth_zbuffer", "normal", "segment_semantic", "class_scene"]
    depth = np.full((4, 4), 1024, np.uint16)
    depth[0, :] = 65535
    files = {
        "rgb": encode_png(np.full((4, 4, 3), 128, np.uint8)),
        "depth_zbuffer": encode_png(depth),
        "normal": encode_png(np.full((4, 4, 3), [128, 128, 255], np.uint8)),
        "segment_semantic": encode_png(np.full((4, 4), 3, np.uint8)),
        "class_scene": encode_npy(np.full(365, 1 / 365, np.float32)),
    }
    assert set(needed_domains(tasks)) == set(files)
    s = SampleProcessor(tasks, img_size=2)("k__point_0_view_0", files)
    assert s["image"].shape == (3, 2, 2) and s["image"].dtype == torch.float32
    # (128/255 - 0.485) / 0.229 for the red channel
    assert s["image"][0, 0, 0].item() == pytest.approx((128 / 255 - 0.485) / 0.229, abs=1e-5)
    assert s["targets"]["segment_semantic"].dtype == torch.int64
    assert s["targets"]["segment_semantic"].shape == (2, 2)
    # top output row covers input rows 0 (invalid) and 1 (valid): half valid -> valid, value 2 m exactly
    assert s["masks"]["depth_zbuffer"].all() and torch.allclose(s["targets"]["depth_zbuffer"], torch.tensor(2.0))
    assert s["targets"]["class_scene"].shape == (63,)


def test_torchvision_png_decoder_returns_the_same_arrays_as_pil(mini_root):
    """data.png_decoder=torchvision is a speed choice only: every release mode decodes identically,
    palette and alpha images fall back to PIL's path, and damaged bytes raise DecodeError."""
    from modsquad_ds.data.layout import SampleId

    sid = SampleId("minibldg000", 0, 0)
    for domain in ("rgb", "depth_zbuffer", "normal", "reshading", "edge_texture", "segment_unsup2d",
                   "segment_semantic", "principal_curvature"):
        data = sid.path(mini_root, domain).read_bytes()
        a, b = decode.decode_png(data), decode.decode_png_torchvision(data)
        assert a.dtype == b.dtype and np.array_equal(a, b), domain
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4)).convert("P").save(buf, format="PNG")
    assert np.array_equal(decode.decode_png_torchvision(buf.getvalue()), decode.decode_png(buf.getvalue()))
    good = sid.path(mini_root, "rgb").read_bytes()
    with pytest.raises(decode.DecodeError):
        decode.decode_png_torchvision(good[:40])
