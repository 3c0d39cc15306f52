r"""Generate mini-Taskonomy: a small data set in exactly the Taskonomy release layout and encodings.

    python -m data_tools.mini_taskonomy --out data/mini_taskonomy
    python -m data_tools.make_shards --root data/mini_taskonomy --split-csv \
        data/mini_taskonomy/splits/train_val_test_mini.csv --out data/mini_shards

Procedurally rendered rooms (boxes, spheres, cylinders, a window with no geometry behind it;
textures from scikit-image's bundled photos) give every domain the paper's 13 tasks read, plus
segment_semantic, written as {out}/{domain}/taskonomy/{building}/point_{p}_view_{v}_domain_{domain}.*
with the split CSV in {out}/splits/ (bare-CR line endings, like the release).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tqdm import tqdm  # noqa: E402

from data_tools.release_io import encode_npy, encode_png  # noqa: E402
from data_tools.worker_pool import imap_unordered  # noqa: E402
from modsquad_ds.data.layout import SampleId, write_split_csv  # noqa: E402

ALL_DOMAINS = ["rgb", "depth_zbuffer", "depth_euclidean", "normal", "reshading", "principal_curvature",
               "edge_texture", "edge_occlusion", "keypoints2d", "keypoints3d", "segment_unsup2d",
               "segment_unsup25d", "segment_semantic", "class_object", "class_scene"]


def building_name(i: int) -> str:
    return f"minibldg{i:03d}"


def render_sample(args) -> list[str]:
    """Render one view and write every domain; returns the written paths (for counting)."""
    out, seed, b, p, v, res, domains = args
    from data_tools.mini import labels, render, scene

    sc = scene.make_scene(seed, b, p, v)
    hits = render.render(sc, res)
    dom = labels.all_domains(sc, hits, res, seed=scene._stable_seed(seed, 'labels', b, p, v) % (2**31))
    sid = SampleId(building_name(b), p, v)
    written = []
    for d in domains:
        path = sid.path(out, d)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = encode_npy(dom[d]) if path.suffix == ".npy" else encode_png(dom[d])
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        written.append(str(path))
    return written


def split_of(i: int, n: int) -> str:
    """Last building test, the one before it val (when there are >= 3), the rest train."""
    if n >= 3 and i == n - 1:
        return "test"
    if n >= 3 and i == n - 2:
        return "val"
    return "train"


def _view_name(job) -> str:
    _, _, b, p, v, _, _ = job
    return f"rendering {building_name(b)} point {p} view {v}"


def generate(out: str | Path, *, buildings: int = 6, points: int = 4, views: int = 3, resolution: int = 64,
             seed: int = 0, workers: int = 1, domains: list[str] | None = None, progress: bool = True) -> Path:
    """Write the data set under ``out``; returns the split CSV's path. Deterministic in ``seed``."""
    out = Path(out)
    domains = domains or ALL_DOMAINS
    jobs = [(out, seed, b, p, v, resolution, domains)
            for b in range(buildings) for p in range(points) for v in range(views)]
    bar = tqdm(total=len(jobs), desc="mini-taskonomy", unit="view", disable=not progress)
    rendering = imap_unordered(render_sample, jobs, workers, describe=_view_name)
    with bar, contextlib.closing(rendering) as rendered:  # the bar ends its line before any message
        for _ in rendered:
            bar.update()
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for b in range(buildings):
        splits[split_of(b, buildings)].append(building_name(b))
    (out / "splits").mkdir(parents=True, exist_ok=True)
    csv = out / "splits" / "train_val_test_mini.csv"
    write_split_csv(csv, splits)
    return csv


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m data_tools.mini_taskonomy", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output root (release layout is written under it)")
    ap.add_argument("--buildings", type=int, default=6, help="buildings (rooms); the last is test, the one "
                    "before val when >= 3 (default 6)")
    ap.add_argument("--points", type=int, default=4, help="camera positions per building (default 4)")
    ap.add_argument("--views", type=int, default=3, help="view directions per point (default 3)")
    ap.add_argument("--resolution", type=int, default=64, help="square image size in pixels (release: 512; "
                    "default 64 fits the CPU demo)")
    ap.add_argument("--seed", type=int, default=0, help="everything is a deterministic function of it")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)), help="processes")
    ap.add_argument("--domains", nargs="*", default=None, help=f"subset of {' '.join(ALL_DOMAINS)}")
    args = ap.parse_args(argv)
    for name in ("buildings", "points", "views"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if args.resolution < 8:
        ap.error("--resolution must be >= 8")
    bad = [d for d in args.domains or [] if d not in ALL_DOMAINS]
    if bad:
        ap.error(f"unknown domains {bad}; known: {' '.join(ALL_DOMAINS)}")
    if args.workers < 1:
        ap.error("--workers must be >= 1")
    try:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        ap.error(f"--out {args.out}: cannot create the folder ({err.strerror or err})")
    try:
        csv = generate(args.out, buildings=args.buildings, points=args.points, views=args.views,
                       resolution=args.resolution, seed=args.seed, workers=args.workers, domains=args.domains)
    except KeyboardInterrupt:  # every file is written whole or not at all (render_sample)
        print("interrupted; run the same command again to finish", file=sys.stderr)
        return 130
    n = args.buildings * args.points * args.views
    print(f"wrote {n} views x {len(args.domains or ALL_DOMAINS)} domains under {args.out}; split file {csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
