"""One validation pass over everything a run needs that can be checked without other ranks.

Called by ``python -m modsquad_ds.train`` on every rank before any process group exists, so a bad
input ends each rank at once with one line (``error: key: message``, exit 2) instead of a traceback
5-20 s later, after the engine is built (and instead of a rank waiting for peers that already quit).
Each check raises :class:`~modsquad_ds.config.ConfigError` naming the setting to change; add new
checks here, not in the trainer.

What is checked (and what would otherwise fail late):
- the shard index: present, valid JSON, our format, every listed shard file present;
- the shards hold every domain the tasks need (the loader raises in the first epoch otherwise);
- the split (or ``data.samples_per_epoch``, or the ``data.fraction`` subset) gives every rank at least
  one full batch;
- the raw folder exists, its split CSV names the splits, and the split has enough complete samples
  (``data.source: raw``);
- shards downscaled by ``make_shards --resize`` match ``model.img_size``;
- ``train.out_dir`` can be created and written (the first save would fail otherwise).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from modsquad_ds.config import ConfigError


def check_shards(cfg, world_size: int) -> None:
    from modsquad_ds.data.sample import needed_domains
    from modsquad_ds.data.shard_index import index_path, load_index

    d = cfg.data
    path = index_path(d.source_path(), d.train_split)
    if not path.is_file():
        raise ConfigError("data.shards_dir", f"no {d.train_split}.index.json in {d.source_path()} "
                          "(write shards with python -m data_tools.make_shards)")
    try:
        index = load_index(path)
    except (ValueError, KeyError, TypeError) as err:  # bad JSON, another format, missing fields
        raise ConfigError("data.shards_dir", f"unreadable shard index: {err}") from None
    lacking = [x for x in needed_domains(list(cfg.tasks.names)) if x not in index.domains]
    if lacking:
        raise ConfigError("tasks.names", f"the shards in {path.parent} lack domains {lacking} "
                          f"(they hold {index.domains}); shard them or drop those tasks")
    # os.stat only, no read: cheap even for thousands of shards. A listed shard that is absent is
    # an error, not a skip: it would silently remove its share of the data from every epoch.
    absent = [s.name for s in index.shards if not os.path.isfile(s.path)]
    if absent:
        more = f" and {len(absent) - 1} more" if len(absent) > 1 else ""
        raise ConfigError("data.shards_dir", f"{path} lists shard {absent[0]}{more} but the file is "
                          "missing (restore it, or rewrite the index with python -m data_tools.make_shards "
                          "--index-only)")
    if problem := index.resolution_problem(cfg.model.img_size):
        raise ConfigError("model.img_size", problem)
    check_batches(cfg, index.num_samples, world_size, f"split {d.train_split!r} of {path.parent}")


def check_batches(cfg, num_samples: int, world_size: int, where: str) -> None:
    """The split's ``num_samples`` (less by data.fraction, capped by data.samples_per_epoch) give every
    rank at least one full batch."""
    from modsquad_ds.data.plan import batches_per_rank

    d = cfg.data
    if d.fraction < 1:  # training reads a fixed subset of the split (data.fraction)
        from modsquad_ds.data.subset import subset_size

        kept, need = subset_size(num_samples, d.fraction), world_size * d.batch_size
        if kept < need:
            raise ConfigError("data.fraction", f"({d.fraction}) keeps {kept} of {num_samples} samples, "
                              f"fewer than one batch per rank (world size {world_size} x data.batch_size "
                              f"{d.batch_size} = {need})")
    try:
        batches_per_rank(min(num_samples, d.samples_per_epoch or num_samples), world_size, d.batch_size)
    except ValueError as err:
        raise ConfigError("data.batch_size", f"{err} ({where})") from None


def check_raw(cfg, world_size: int) -> None:
    """The raw release folder, the split CSV and its columns, and enough complete samples. Scans the
    training split's folders (directory reads only: layout.scan_release), as the loader does again."""
    from modsquad_ds.data.layout import read_split_csv, scan_release
    from modsquad_ds.data.sample import needed_domains

    d = cfg.data
    check_split(cfg, d.train_split, "data.raw_root")
    buildings = None
    if d.split_csv:
        try:
            splits = read_split_csv(d.split_csv)
        except (OSError, ValueError) as err:
            raise ConfigError("data.split_csv", f"unreadable: {err}") from None
        for split, key in ((d.train_split, "data.train_split"), (d.val_split, "data.val_split")):
            if (split == d.train_split or cfg.train.eval_every) and split not in splits:
                raise ConfigError(key, f"{split!r} is not a column of {d.split_csv} ({', '.join(splits)})")
        buildings = splits[d.train_split]
    root = d.source_path()
    found = len(scan_release(root, needed_domains(list(cfg.tasks.names)), buildings).samples)
    if not found:
        raise ConfigError("data.raw_root", f"no complete sample of split {d.train_split!r} under {root} for "
                          "the domains tasks.names needs")
    check_batches(cfg, found, world_size, f"split {d.train_split!r} of {root}")


def check_split(cfg, split: str, key: str) -> None:
    """The data of ``split`` exists (its shard index, or the raw release folder); ``key`` is the
    setting or flag that asked for the split, named in the error."""
    from modsquad_ds.data.shard_index import index_path

    source = cfg.data.source_path()
    if cfg.data.source == "shards":
        if not index_path(source, split).is_file():
            raise ConfigError(key, f"no {split}.index.json in {source} (write it with "
                              f"python -m data_tools.make_shards --split {split} ...)")
    elif not os.path.isdir(source):
        raise ConfigError("data.raw_root", f"folder not found: {source}")


def check_out_dir(out_dir: str) -> None:
    """Create ``out_dir`` and write a probe file into it (a permission, a read-only mount or a file
    in the way all surface here)."""
    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
            pass
    except OSError as err:
        raise ConfigError("train.out_dir", f"cannot create or write {path}: {err.strerror or err}") from None


def check_run(cfg, world_size: int) -> None:
    """All checks for a training run of ``world_size`` ranks; raises ConfigError."""
    if cfg.data.source == "shards":
        check_shards(cfg, world_size)
        if cfg.train.eval_every:  # validation on data.val_split
            check_split(cfg, cfg.data.val_split, "train.eval_every")
    else:  # the raw release folder
        check_raw(cfg, world_size)
    check_out_dir(cfg.train.out_dir)
