"""mini-Taskonomy output passes the same checks as real release files."""

import numpy as np
import pytest

from data_tools.mini import labels
from data_tools.mini_taskonomy import ALL_DOMAINS, generate, main
from data_tools.release_checks import check_sample
from modsquad_ds.data.decode import decode_npy, decode_png
from modsquad_ds.data.layout import SampleId, scan_release


def _files(root, sid):
    return {d: sid.path(root, d).read_bytes() for d in ALL_DOMAINS}


def test_every_view_passes_release_checks(mini_root):
    scan = scan_release(mini_root, ALL_DOMAINS)
    assert len(scan.samples) == 30 and not scan.incomplete
    for sid in scan.samples:
        assert check_sample(_files(mini_root, sid)) == [], sid


def test_release_checks_catch_wrong_encodings(mini_root):
    from data_tools.release_io import encode_png

    files = _files(mini_root, SampleId("minibldg000", 0, 0))
    files["depth_zbuffer"] = encode_png(np.zeros((24, 24), np.uint8))  # 8-bit depth: wrong
    assert any("depth_zbuffer" in p for p in check_sample(files))


def test_windows_have_no_geometry_with_release_invalid_codes(mini_root):
    found = 0
    for sid in scan_release(mini_root, ["depth_zbuffer"]).samples:
        depth = decode_png(sid.path(mini_root, "depth_zbuffer").read_bytes())
        invalid = depth == 65535
        if invalid.any():
            found += 1
            assert np.all(decode_png(sid.path(mini_root, "depth_euclidean").read_bytes())[invalid] == 65535)
            assert np.all(decode_png(sid.path(mini_root, "normal").read_bytes())[invalid] == 128)
            assert np.all(decode_png(sid.path(mini_root, "principal_curvature").read_bytes())[invalid] == 0)
            assert np.all(decode_png(sid.path(mini_root, "segment_semantic").read_bytes())[invalid] == 0)
    assert found > 0


def test_2d_labels_follow_the_documented_recipes(mini_root):
    sid = SampleId("minibldg001", 1, 1)
    rgb = decode_png(sid.path(mini_root, "rgb").read_bytes())
    assert np.array_equal(decode_png(sid.path(mini_root, "edge_texture").read_bytes()), labels.edge_texture(rgb))
    assert np.array_equal(decode_png(sid.path(mini_root, "keypoints2d").read_bytes()), labels.keypoints2d(rgb))
    depth = decode_png(sid.path(mini_root, "depth_zbuffer").read_bytes())
    assert np.array_equal(decode_png(sid.path(mini_root, "edge_occlusion").read_bytes()),
                          labels.edge_occlusion(depth))


def test_class_vectors_have_release_lengths_and_follow_content(mini_root):
    from data_tools.mini.scene import ROOM_TYPES, building_room

    for b in range(5):
        sid = SampleId(f"minibldg{b:03d}", 0, 0)
        obj = decode_npy(sid.path(mini_root, "class_object").read_bytes())
        places = decode_npy(sid.path(mini_root, "class_scene").read_bytes())
        assert obj.shape == (1000,) and places.shape == (365,)
        assert places.sum() == pytest.approx(1.0, abs=1e-4)
        _, room_type, _ = building_room(0, b)
        assert int(places.argmax()) == ROOM_TYPES[room_type][3]  # the scene class is the room's type


def test_geometry_is_consistent_across_domains(mini_root):
    """Walls, floor and ceiling are planes: both principal curvatures encode as 127 (zero)."""
    for sid in scan_release(mini_root, ["principal_curvature"]).samples:
        curv = decode_png(sid.path(mini_root, "principal_curvature").read_bytes())
        sem = decode_png(sid.path(mini_root, "segment_semantic").read_bytes())
        room = sem == 1
        assert np.all(curv[room][:, :2] == 127)


def test_generator_is_deterministic_and_cli_writes_release_layout(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    generate(a, buildings=1, points=1, views=1, resolution=16, seed=3, progress=False,
             domains=["rgb", "depth_zbuffer", "class_object"])
    assert main(["--out", str(b), "--buildings", "1", "--points", "1", "--views", "1", "--resolution", "16",
                 "--seed", "3", "--workers", "1", "--domains", "rgb", "depth_zbuffer", "class_object"]) == 0
    for d in ("rgb", "depth_zbuffer", "class_object"):
        p = SampleId("minibldg000", 0, 0).path
        assert p(a, d).read_bytes() == p(b, d).read_bytes()
    assert (a / "rgb" / "taskonomy" / "minibldg000" / "point_0_view_0_domain_rgb.png").is_file()


def test_an_output_path_through_a_file_gets_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit) as stop:
        main(["--out", str(tmp_path / "afile" / "release")])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("cannot create the folder (Not a directory)")


def test_euclidean_depth_may_round_one_unit_below_zbuffer_depth_not_more():
    """Euclidean depth is never shorter than z-buffer depth, but both are rounded to 1/512 m: one unit
    less is rounding, two units less is a wrong file."""
    from data_tools.release_io import encode_png

    z = np.full((4, 4), 1000, np.uint16)
    for shorter, expected in ((0, []), (1, []), (2, ["depth_euclidean is shorter than depth_zbuffer somewhere"])):
        e = z.copy()
        e[1, 2] -= shorter
        files = {"depth_zbuffer": encode_png(z), "depth_euclidean": encode_png(e)}
        assert check_sample(files) == expected, shorter
