"""Config loading: sections, dotted overrides, and errors that name the key and value."""

import pytest

from rank1_core.config import Config, ConfigError, config_from_dict, load_config, section_hash
from tests.conftest import REPO


@pytest.mark.parametrize("name", ["demo.yaml", "tiny.yaml", "qwen2.5-32b-s1k.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / name)
    assert isinstance(cfg, Config)
    assert cfg.source.endswith(name)


def test_dotted_overrides_parse_yaml_values():
    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      ["run.seed=7", "data.hesitation_share=0.5", "model.tiny.num_layers=3", "run.dir=/tmp/x"])
    assert cfg.run.seed == 7
    assert cfg.data.hesitation_share == 0.5
    assert cfg.model.tiny.num_layers == 3
    assert cfg.run.dir == "/tmp/x"


def test_unknown_key_is_named_with_its_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("data:\n  num_tracez: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*unknown key 'data\.num_tracez'"):
        load_config(f)


def test_unknown_override_key():
    with pytest.raises(ConfigError, match=r"unknown key 'model\.tiny\.layerz'"):
        load_config(REPO / "configs" / "tiny.yaml", ["model.tiny.layerz=3"])


@pytest.mark.parametrize("override,match", [
    ("run.seed=abc", r"'run\.seed' must be an integer, got 'abc'"),
    ("data.source=hub", r"'data\.source' must be one of \['synthetic', 's1k', 'chat'\], got 'hub'"),
    ("data.hesitation_share=1.5", r"data\.hesitation_share must be in \[0, 1\], got 1\.5"),
    ("model.tiny.num_heads=3", r"hidden_size \(64\) must be divisible by model\.tiny\.num_heads \(3\)"),
    ("data.max_seq_len=true", r"'data\.max_seq_len' must be an integer, got True"),
    ("stages=[prepare, nope]", r"unknown stage 'nope'"),
])
def test_bad_values_are_named(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(REPO / "configs" / "tiny.yaml", [override])


def test_override_without_equals():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(REPO / "configs" / "tiny.yaml", ["run.seed"])


def test_s1k_needs_a_path():
    with pytest.raises(ConfigError, match="data.path is required"):
        config_from_dict({"data": {"source": "s1k"}})


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nope/missing.yaml")


def test_stage_hash_covers_only_its_sections():
    a = config_from_dict({})
    b = config_from_dict({}, ["ray.num_cpus=8", "run.dir=/elsewhere", "plan.tokens=5"])
    c = config_from_dict({}, ["data.num_traces=500"])
    assert section_hash(a, "prepare") == section_hash(b, "prepare")
    assert section_hash(a, "prepare") != section_hash(c, "prepare")
