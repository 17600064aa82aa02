"""Presets, foreign config readers, and full-size shapes checked without allocating weights."""

import math

import jax
import pytest

from mixtral_jax import config, model
from mixtral_jax.errors import ConfigError


def _param_count(cfg):
    _, abstract = model.abstract(cfg)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))


def test_mixtral_8x7b_has_46_7b_params_12_9b_active():
    cfg = config.preset("mixtral-8x7b")
    total = _param_count(cfg)
    expert = 3 * cfg.dim * cfg.ffn_dim * cfg.n_layers
    active = total - (cfg.n_experts - cfg.top_k) * expert
    assert round(total / 1e9, 1) == 46.7
    assert round(active / 1e9, 1) == 12.9
    assert cfg.sliding_window is None and cfg.rope_theta == 1e6


def test_mixtral_8x22b_and_mistral_7b_sizes():
    assert round(_param_count(config.preset("mixtral-8x22b")) / 1e9) == 141
    mistral = config.preset("mistral-7b")
    assert round(_param_count(mistral) / 1e9, 1) == 7.2 and mistral.sliding_window == 4096


def test_tiny_preset_is_a_few_million_params():
    assert 1e6 < _param_count(config.preset("tiny")) < 1e7


HF_MIXTRAL = {
    "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
    "num_experts_per_tok": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "sliding_window": None,
    "router_aux_loss_coef": 0.02, "torch_dtype": "bfloat16",
}


@pytest.mark.parametrize("rope", [{"rope_theta": 1e6},
                                  {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}])
def test_hf_config_both_rope_layouts_equal_the_preset(rope):
    assert config.from_hf_config({**HF_MIXTRAL, **rope}) == config.preset("mixtral-8x7b")


def test_params_json_without_rope_theta_means_1e6():
    params = {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8,
              "norm_eps": 1e-5, "vocab_size": 32000, "moe": {"num_experts_per_tok": 2, "num_experts": 8}}
    cfg = config.from_params_json(params)
    assert cfg.replace(max_seq_len=32768) == config.preset("mixtral-8x7b")


@pytest.mark.parametrize("bad", [dict(n_heads=6, n_kv_heads=4), dict(top_k=9), dict(dtype="int4"), dict(dim=0)])
def test_invalid_configs_raise(bad):
    with pytest.raises(ConfigError):
        config.preset("tiny").replace(**bad)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="mixtral-8x7b"):
        config.preset("mixtral-9x9b")
