"""ModelConfig: HF round trip, presets, and one clear error per bad-input rule."""

from __future__ import annotations

import copy

import pytest

from cpmjax import presets
from cpmjax.config import ConfigError, ModelConfig
from cpmjax.model import count_params
from tests.conftest import tiny_hf_config


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_presets_round_trip_field_for_field(name):
    hf = presets.PRESETS[name]()
    assert ModelConfig.from_hf_config(hf).to_hf_config() == hf


def test_unknown_keys_survive_round_trip():
    hf = tiny_hf_config(auto_map={"AutoConfig": "configuration_minicpm.MiniCPMConfig"},
                        use_cache=True, transformers_version="4.46.0")
    out = ModelConfig.from_hf_config(copy.deepcopy(hf)).to_hf_config()
    assert out == hf


def test_sparse_config_round_trip_and_derived_topk():
    hf = presets.minicpm4_8b()
    cfg = ModelConfig.from_hf_config(hf)
    assert cfg.sparse_config.total_topk == 96 and cfg.sparse_config.local_blocks == 32
    assert cfg.to_hf_config()["sparse_config"] == hf["sparse_config"]


def test_param_count_of_8b_preset_from_shapes_alone():
    n = count_params(ModelConfig.from_hf_config(presets.minicpm4_8b()))
    assert abs(n - 8.19e9) / 8.19e9 < 0.005, n


def test_param_count_of_0p5b_preset():
    n = count_params(ModelConfig.from_hf_config(presets.minicpm4_0p5b()))
    assert abs(n - 434e6) / 434e6 < 0.01, n


def test_muP_derived_scalars():
    cfg = ModelConfig.from_hf_config(presets.minicpm4_8b())
    assert cfg.residual_scale == pytest.approx(1.4 / 32 ** 0.5)
    assert cfg.width_multiplier == 16 and cfg.num_groups == 16 and cfg.head_dim == 128


@pytest.mark.parametrize("overrides, field, rule", [
    ({"num_attention_heads": 4, "num_key_value_heads": 3}, "num_attention_heads", "divisible"),
    ({"hidden_size": 66}, "hidden_size", "divisible by num_attention_heads"),
    ({"vocab_size": 0}, "vocab_size", "positive"),
    ({"num_hidden_layers": -2}, "num_hidden_layers", "positive"),
    ({"intermediate_size": 1.5}, "intermediate_size", "positive integer"),
    ({"rms_norm_eps": 0.0}, "rms_norm_eps", "positive"),
    ({"eos_token_id": [2, 500]}, "eos_token_id", "vocab_size"),
    ({"hidden_act": "gelu"}, "hidden_act", "silu"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type",
     "must be one of"),
    ({"sparse_config": {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1,
                        "block_size": 64, "window_size": 100, "topk": 64, "use_nope": False,
                        "dense_len": 8192}}, "sparse_config.window_size", "multiple of block_size"),
    ({"sparse_config": {"kernel_size": 16, "kernel_stride": 32, "init_blocks": 1,
                        "block_size": 64, "window_size": 128, "topk": 4, "use_nope": False,
                        "dense_len": 0}}, "sparse_config.kernel_stride", "kernel_size"),
    ({"sparse_config": {"kernel_size": 32, "kernel_stride": 16, "block_size": 64,
                        "window_size": 128, "topk": 0}}, "sparse_config.topk", "positive"),
    ({"sparse_config": {"kernel_size": 32, "kernel_stride": 16, "block_sz": 64}},
     "sparse_config", "unknown keys"),
    ({"model_type": "gpt2"}, "model_type", "unsupported"),
])
def test_bad_config_names_field_and_rule(overrides, field, rule):
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf_config(tiny_hf_config(**overrides))
    assert repr(field) in str(e.value) and rule in str(e.value)


def test_wrong_length_rope_factor_list_names_the_list():
    hf = tiny_hf_config()
    hf["rope_scaling"] = dict(hf["rope_scaling"], long_factor=[1.0] * 5)
    with pytest.raises(ConfigError, match=r"rope_scaling.long_factor.*head_dim/2 = 8.*5 factors"):
        ModelConfig.from_hf_config(hf)


def test_config_is_immutable_and_hashable(tiny_cfg):
    with pytest.raises(TypeError):
        tiny_cfg.rope_scaling["rope_type"] = "default"
    assert hash(tiny_cfg) == hash(ModelConfig.from_hf_config(tiny_hf_config()))
