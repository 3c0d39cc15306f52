"""Per-task transforms: mask-aware resize, nearest for ids, flips that negate normal x."""

import torch

from modsquad_ds.data import transforms


def test_mask_aware_resize_ignores_invalid_pixels():
    # 2x2 -> 1x1: three valid pixels 1, 2, 3 m and one "no geometry" 128 m that must not bleed in.
    depth = torch.tensor([[[1.0, 2.0], [3.0, 127.998]]])
    mask = torch.tensor([[True, True], [True, False]])
    out, m = transforms.resize_label("depth_zbuffer", depth, mask, 1)
    assert out.item() == 2.0 and m.item() is True


def test_mostly_invalid_area_becomes_invalid():
    depth = torch.tensor([[[1.0, 5.0], [5.0, 5.0]]])
    mask = torch.tensor([[True, False], [False, False]])
    _, m = transforms.resize_label("depth_zbuffer", depth, mask, 1)
    assert m.item() is False


def test_segment_ids_use_nearest_never_averaged():
    seg = torch.tensor([[[0.0, 0.0, 1.0, 1.0]] * 4]) * 200 / 255
    out, _ = transforms.resize_label("segment_unsup2d", seg, None, 2)
    assert set(out.unique().tolist()) <= set(seg.unique().tolist())


def test_resized_normals_stay_unit_length():
    n = torch.zeros(3, 2, 2)
    n[0, :, 0] = 1.0  # left column +x, right column +z
    n[2, :, 1] = 1.0
    out, _ = transforms.resize_label("normal", n, torch.ones(2, 2, dtype=torch.bool), 1)
    assert torch.allclose(out.norm(dim=0), torch.tensor(1.0))
    assert torch.allclose(out[:, 0, 0], torch.tensor([2**-0.5, 0.0, 2**-0.5]))


def test_hflip_negates_normal_x_only():
    n = torch.zeros(3, 1, 2)
    n[:, 0, 0] = torch.tensor([0.6, 0.0, 0.8])
    out, _ = transforms.hflip("normal", n, None)
    assert torch.allclose(out[:, 0, 1], torch.tensor([-0.6, 0.0, 0.8]))
    d = torch.tensor([[[1.0, 2.0]]])
    assert transforms.hflip("depth_zbuffer", d, None)[0].tolist() == [[[2.0, 1.0]]]


def test_hflip_mirrors_the_mask_with_its_map():
    """A mask is a per-pixel map too: after a flip it must still sit on the pixels it describes.
    One row of three pixels with only the left one valid (an asymmetric mask): the flipped mask has
    only the right one valid, for a scalar map and for normals (whose x is negated, y and z kept);
    curvature (k1, k2 are magnitudes) is only mirrored; a task without a mask stays without one."""
    mask = torch.tensor([[True, False, False]])
    d = torch.tensor([[[1.0, 2.0, 3.0]]])
    t, m = transforms.hflip("depth_zbuffer", d, mask)
    assert t.tolist() == [[[3.0, 2.0, 1.0]]]
    assert m.tolist() == [[False, False, True]]
    assert mask.tolist() == [[True, False, False]]  # the input mask is not modified in place
    n = torch.tensor([[[0.6, 0.0, 0.0]], [[0.0, 1.0, 0.0]], [[0.8, 0.0, 1.0]]])  # (3, 1, 3)
    t, m = transforms.hflip("normal", n, mask)
    assert torch.equal(t[:, 0, 2], torch.tensor([-0.6, 0.0, 0.8]))
    assert torch.equal(t[:, 0, 1], torch.tensor([0.0, 1.0, 0.0]))
    assert torch.equal(t[:, 0, 0], torch.tensor([-0.0, 0.0, 1.0]))
    assert m.tolist() == [[False, False, True]]
    assert torch.equal(n[0, 0], torch.tensor([0.6, 0.0, 0.0]))  # the caller's normals are not negated in place
    k = torch.tensor([[[0.5, 0.0, -0.25]], [[-0.5, 0.0, 0.25]]])
    t, m = transforms.hflip("principal_curvature", k, mask)
    assert t.tolist() == [[[-0.25, 0.0, 0.5]], [[0.25, 0.0, -0.5]]] and m.tolist() == [[False, False, True]]
    assert transforms.hflip("edge_texture", d, None)[1] is None


def test_flip_decision_is_a_deterministic_fair_coin():
    keys = [f"b__point_{i}_view_0" for i in range(400)]
    a = [transforms.flip_decision(0, 3, k) for k in keys]
    assert a == [transforms.flip_decision(0, 3, k) for k in keys]
    assert 150 < sum(a) < 250
    assert a != [transforms.flip_decision(0, 4, k) for k in keys]
