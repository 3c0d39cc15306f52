"""The data config section: validation messages name the key; the shipped YAML loads."""

from pathlib import Path

import pytest

from modsquad_ds.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("override,key", [
    ("data.workers=-1", "data.workers"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.source=s3", "data.source"),
    ("data.max_corrupt=-2", "data.max_corrupt"),
    ("data.class_object_keep=[1,2,3]", "data.class_object_keep"),
    ("data.class_scene_keep=" + str(list(range(62)) + [400]), "data.class_scene_keep"),
    ("data.samples_per_epoch=0", "data.samples_per_epoch"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert err.value.key == key


def test_source_path_requires_the_matching_key():
    with pytest.raises(ConfigError, match="data.shards_dir"):
        load_config().data.source_path()
    with pytest.raises(ConfigError, match="data.raw_root"):
        load_config(overrides=["data.source=raw"]).data.source_path()


def test_shipped_mini_config_loads():
    cfg = load_config([REPO / "configs" / "mini_taskonomy.yaml"])
    assert cfg.data.source == "shards" and cfg.data.shards_dir == "data/mini_shards"


def test_custom_class_subset_is_used(tmp_path):
    import numpy as np

    from modsquad_ds.data.decode import class_probs

    keep = list(range(100, 200))
    cfg = load_config(overrides=[f"data.class_object_keep={keep}"])
    logits = np.zeros(1000, np.float32)
    logits[150] = 5.0
    p = class_probs(logits, cfg.data.class_object_keep, 1000, "class_object")
    assert p.argmax() == 50
