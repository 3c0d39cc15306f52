from pathlib import Path

import pytest
import yaml

from modsquad_ds.config import PRESETS, ConfigError, load_config, save_config, to_dict


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_resolves(preset):
    cfg = load_config(preset=preset)
    assert cfg.preset == preset
    assert cfg.moe.mlp.top_k <= cfg.moe.mlp.num_experts


def test_paper_settings_in_presets():
    small, base = load_config(preset="small"), load_config(preset="base")
    assert (small.model.embed_dim, small.moe.attn.num_experts, small.moe.attn.top_k) == (384, 15, 6)
    assert (small.moe.mlp.num_experts, small.moe.mlp.top_k) == (16, 4)
    assert (base.model.embed_dim, base.moe.attn.num_experts, base.moe.attn.top_k) == (768, 24, 12)
    # expert hidden size defaults to dense hidden / top-k (paper Sec. 4.1): 4*768/4 = 768
    assert base.moe.mlp.resolved_dim(base.model.mlp_hidden) == 768
    assert small.moe.attn.resolved_dim(small.model.embed_dim) == 64


def test_yaml_then_overrides_layer_in_order(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("preset: small\nmoe:\n  mlp:\n    top_k: 2\nloss:\n  w_mi: 0.005\n")
    cfg = load_config([run], ["moe.mlp.top_k=3", "tasks.names=[normal, class_scene]"])
    assert cfg.preset == "small" and cfg.model.embed_dim == 384
    assert cfg.moe.mlp.top_k == 3 and cfg.loss.w_mi == 0.005
    assert cfg.tasks.names == ["normal", "class_scene"]


def test_exponent_without_dot_is_a_number_not_a_string():
    assert load_config(overrides=["train.lr=1e-3"]).train.lr == 1e-3
    with pytest.raises(ConfigError, match="must be a number"):
        load_config(overrides=["train.lr=fast"])


def test_int_is_accepted_for_float_and_saved_config_round_trips(tmp_path):
    cfg = load_config(overrides=["loss.w_mi=1", "model.pretrained=/tmp/x.pth"])
    assert cfg.loss.w_mi == 1.0 and isinstance(cfg.loss.w_mi, float)
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config([tmp_path / "resolved.yaml"])
    assert to_dict(again) == to_dict(cfg)
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["preset"] == "tiny"


@pytest.mark.parametrize("override, key, words", [
    ("moe.mlp.topk=3", "moe.mlp.topk", "unknown key"),
    ("moe.mlp.top_k=30", "moe.mlp.top_k", "num_experts"),
    ("moe.attn.top_k=0", "moe.attn.top_k", ">= 1"),
    ("model.img_size=33", "model.img_size", "multiple of model.patch_size"),
    ("model.depth=two", "model.depth", "integer"),
    ("moe.router_noise=1", "moe.router_noise", "true or false"),
    ("moe.placement=sometimes", "moe.placement", "alternate"),
    ("loss.aux=entropy", "loss.aux", "mi"),
    ("loss.task_weights={depth: 1.0}", "loss.task_weights.depth", "tasks.names"),
    ("tasks.names=[normal, depth]", "tasks.names[1]", "unknown task 'depth'"),
    ("moe.first_block=9", "moe.first_block", "model.depth"),
    ("preset=huge", "preset", "unknown preset"),
    ("data.batch_size=0", "data.batch_size", ">= 1"),
    ("nonsense", "nonsense", "section.key=value"),
    ("train.lr=inf", "train.lr", "must be a finite number, got inf"),  # > 0, but a NaN storm 10 steps later
    ("loss.w_mi=.nan", "loss.w_mi", "must be a finite number"),
])
def test_bad_values_name_the_key(override, key, words):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert err.value.key == key
    assert words in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_yaml_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config([tmp_path / "missing.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config([bad])


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[3] / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_run_file_loads(path):
    cfg = load_config([path])
    assert cfg.data.source_path()  # names its data
    assert to_dict(load_config([path])) == to_dict(cfg)


def test_set_parses_null_empty_bools_and_lists():
    """--set values are YAML: null clears an optional setting, an empty value is the empty string,
    true/false are booleans (and not integers: model.depth=true is refused), a list is a list."""
    cfg = load_config(overrides=["moe.mlp.expert_dim=16"])
    assert cfg.moe.mlp.expert_dim == 16
    cfg = load_config(overrides=["moe.mlp.expert_dim=16", "moe.mlp.expert_dim=null", "model.pretrained=",
                                 "moe.router_noise=false", "tasks.names=[normal]"])
    assert cfg.moe.mlp.expert_dim is None and cfg.model.pretrained == ""
    assert cfg.moe.router_noise is False and cfg.tasks.names == ["normal"]
    with pytest.raises(ConfigError, match="model.depth: must be an integer, got True"):
        load_config(overrides=["model.depth=true"])


def test_preset_comes_from_the_last_file_that_names_one(tmp_path):
    first, second, plain = tmp_path / "a.yaml", tmp_path / "b.yaml", tmp_path / "c.yaml"
    first.write_text("preset: small\n")
    second.write_text("preset: base\n")
    plain.write_text("seed: 3\n")
    assert load_config([first, second, plain]).preset == "base"
    assert load_config([second, first]).preset == "small"
    assert load_config([second], ["preset=small"]).preset == "small"


def test_boundary_values_that_are_allowed():
    """All experts chosen (top_k == num_experts) and an all-dense model (first_block == depth) are
    valid settings; one more is refused. A task listed twice is refused."""
    cfg = load_config(overrides=["moe.mlp.top_k=8", "moe.first_block=4"])
    assert (cfg.moe.mlp.top_k, cfg.moe.mlp.num_experts, cfg.moe.first_block, cfg.model.depth) == (8, 8, 4, 4)
    with pytest.raises(ConfigError, match="moe.first_block: \\(5\\) must be <= model.depth \\(4\\)"):
        load_config(overrides=["moe.first_block=5"])
    with pytest.raises(ConfigError, match="tasks.names: lists a task twice"):
        load_config(overrides=["tasks.names=[normal, normal]"])
