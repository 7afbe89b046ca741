"""The model's attention dispatch: kernel names from the config, every dense implementation
giving the same model outputs, no T x T array in a long training step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpmjax.api import Model
from cpmjax.config import ConfigError, ModelConfig
from cpmjax.model import init_params
from cpmjax.model.rope import rope_frequencies
from cpmjax.presets import MINICPM4_128K_FACTORS, model_config
from cpmjax.train.experiment import check_experiment, experiment_config, kernel_names
from cpmjax.train.step import token_loss_sums
from tests.conftest import tiny_hf_config


def _packed_batch(cfg: ModelConfig, T: int) -> dict[str, jax.Array]:
    toks = jax.random.randint(jax.random.key(1), (2, T), 0, cfg.vocab_size)
    cut = T // 3
    seg = jnp.where(jnp.arange(T) < cut, 1, 2)[None].repeat(2, 0)
    pos = jnp.where(jnp.arange(T) < cut, jnp.arange(T), jnp.arange(T) - cut)[None].repeat(2, 0)
    return {"inputs": toks, "targets": jnp.roll(toks, -1, 1), "segment_ids": seg,
            "positions": pos, "loss_mask": jnp.ones((2, T), jnp.float32)}


def test_kernel_names_come_from_the_config_and_bad_ones_name_the_field():
    exp = experiment_config(tiny_hf_config(), "t")
    assert kernel_names(exp) == {"attn_impl": "auto", "sparse_impl": "auto"}
    exp.kernels.attention_impl = "xla"
    assert kernel_names(exp)["attn_impl"] == "xla"
    exp.kernels.attention_impl = "flash9"
    with pytest.raises(ConfigError, match="'kernels.attention_impl'.*flash9"):
        kernel_names(exp)
    exp.kernels.attention_impl, exp.kernels.sparse_attention_impl = "auto", "nope"
    with pytest.raises(ConfigError, match="'kernels.sparse_attention_impl'"):
        kernel_names(exp)
    with pytest.raises(ConfigError, match="'kernels.sparse_attention_impl'"):
        check_experiment(exp)  # what launch/train.py validates before anything runs
    with pytest.raises(ConfigError, match="argument attn_impl"):
        Model(ModelConfig.from_hf_config(tiny_hf_config()), {}, attn_impl="bad")


def test_dense_implementations_give_the_reference_loss_and_gradients():
    cfg = ModelConfig.from_hf_config(tiny_hf_config(num_hidden_layers=2))
    params = init_params(cfg, jax.random.key(0))
    batch = _packed_batch(cfg, 96)

    def loss(p, name):
        s, n = token_loss_sums(p, cfg, batch, jnp.float32, "none", attn_impl=name)
        return s / n

    want, want_g = jax.jit(jax.value_and_grad(lambda p: loss(p, "reference")))(params)
    for impl in ("xla", "splash_interpret"):
        got, got_g = jax.jit(jax.value_and_grad(lambda p: loss(p, impl)))(params)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
            np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-4)


def test_a_long_training_step_holds_no_t_by_t_array():
    """The train loss's gradient at T=8192 compiles (CPU) with temporaries below one T x T
    float32 score matrix of a single head (256 MiB); the oracle needs several."""
    cfg = ModelConfig.from_hf_config(tiny_hf_config(num_hidden_layers=1))
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    T = 8192
    batch = jax.eval_shape(lambda: _packed_batch(cfg, T))

    def temp_bytes(name: str) -> int:
        grad = jax.jit(jax.grad(lambda p, b: token_loss_sums(
            p, cfg, b, jnp.float32, "full", attn_impl=name)[0]))
        return grad.lower(params, batch).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes("xla") < T * T * 4
    assert temp_bytes("reference") > T * T * 4


def test_128k_presets_swap_the_factor_lists_without_attention_scaling():
    cfg = model_config("minicpm4_8b_128k")
    assert cfg.max_position_embeddings == 131072
    assert cfg.rope_scaling["original_max_position_embeddings"] == 32768
    inv_freq, scaling = rope_frequencies(cfg)
    assert scaling == 1.0  # sqrt(1 + ln 4 / ln 32768) = 1.063 without attention_factor
    base = 1.0 / (cfg.rope_theta ** (np.arange(0, 128, 2) / 128))
    np.testing.assert_allclose(inv_freq, base / np.asarray(MINICPM4_128K_FACTORS), rtol=1e-6)
    assert model_config("minicpm41_8b_128k").rope_scaling["original_max_position_embeddings"] \
        == 65536
    bad = tiny_hf_config()
    bad["rope_scaling"] = {**bad["rope_scaling"], "attention_factor": -1}
    with pytest.raises(ConfigError, match="attention_factor"):
        ModelConfig.from_hf_config(bad)
