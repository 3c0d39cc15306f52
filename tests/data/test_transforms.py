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


def test_flip_decision_is_a_deterministic_fair_coin():
    keys = [f"b__point_{i}_view_0" for i in range(400)]
    a = [transforms.flip_decision(0, 3, k) for k in keys]
    assert a == [transforms.flip_decision(0, 3, k) for k in keys]
    assert 150 < sum(a) < 250
    assert a != [transforms.flip_decision(0, 4, k) for k in keys]
