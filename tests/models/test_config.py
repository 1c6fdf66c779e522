import pytest

from fastserve_ray.config import ModelConfig, config_from_dict, load_yaml
from fastserve_ray.errors import ConfigError
from fastserve_ray.models import PRESETS, build_model, get_preset, num_params, parse_preset_spec


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(dim=100, n_heads=3), "n_heads=3 does not divide model.dim=100"),
        (dict(n_heads=8, n_kv_heads=3, dim=64), "n_kv_heads=3 does not divide model.n_heads=8"),
        (dict(dim=12, n_heads=4), "must be even for RoPE"),
        (dict(arch="mamba"), "unknown architecture 'mamba'"),
        (dict(vocab_size=0), "vocab_size must be >= 1, got 0"),
        (dict(n_layers=-1), "n_layers must be >= 1, got -1"),
        (dict(norm_eps=0.0), "norm_eps must be > 0"),
    ],
)
def test_impossible_shapes_name_the_values(kwargs, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig(**kwargs)


def test_unknown_and_mistyped_keys_are_rejected():
    with pytest.raises(ConfigError, match="unknown key.*'dimm'"):
        ModelConfig.from_dict({"dimm": 3})
    with pytest.raises(ConfigError, match="model.dim: expected an integer, got '64'"):
        ModelConfig.from_dict({"dim": "64"})
    with pytest.raises(ConfigError, match="expected true/false"):
        ModelConfig.from_dict({"qkv_bias": 1})


def test_derived_defaults():
    cfg = ModelConfig(dim=192, n_heads=6)
    assert cfg.n_kv_heads == 6
    assert cfg.ffn_dim == 512  # 8/3 * 192 = 512, already a multiple of 64
    assert cfg.head_dim == 32


def test_preset_sizes_match_their_promises():
    import torch

    def count(name, non_embedding=False):
        with torch.device("meta"):
            return num_params(build_model(get_preset(name)), non_embedding=non_embedding)

    assert count("tiny") < 1_000_000
    assert 25e6 <= count("bench", non_embedding=True) <= 35e6
    assert 100e6 <= count("llama-125m") <= 150e6
    assert 300e6 <= count("llama-350m") <= 400e6
    assert 0.9e9 <= count("llama-1b") <= 1.3e9
    for name in PRESETS:  # every preset builds
        get_preset(name)


def test_preset_overrides():
    assert get_preset("small", n_layers=2).n_layers == 2
    cfg = parse_preset_spec("small, n_layers=2, qkv_bias=true")
    assert (cfg.n_layers, cfg.qkv_bias, cfg.dim) == (2, True, get_preset("small").dim)
    with pytest.raises(ConfigError, match="unknown model preset 'huge'"):
        get_preset("huge")
    with pytest.raises(ConfigError, match="unknown key.*'layers'"):
        parse_preset_spec("small,layers=2")
    with pytest.raises(ConfigError, match="must look like key=value"):
        parse_preset_spec("small,n_layers")


def test_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match=f"{bad} is not valid YAML"):
        load_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_yaml(lst)


def test_config_from_dict_rejects_non_mapping():
    with pytest.raises(ConfigError, match="expected a mapping"):
        config_from_dict(ModelConfig, [1, 2])
