"""Properties of the forward pass that hold without any reference implementation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpmjax.config import ModelConfig
from cpmjax.model import forward, init_cache, init_params, param_axes, param_specs
from cpmjax.model.rope import rope_frequencies
from cpmjax.parallel import LOGICAL_AXIS_RULES
from tests.conftest import tiny_hf_config


def _tokens(cfg, B=2, T=12, seed=0):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, cfg.vocab_size)


def test_every_param_has_logical_axes_matching_its_rank(tiny_cfg):
    params = init_params(tiny_cfg, jax.random.key(0))
    axes = param_axes(tiny_cfg)
    flat_p = jax.tree.leaves_with_path(params)
    flat_a = dict(jax.tree.leaves_with_path(axes, is_leaf=lambda a: isinstance(a, tuple)))
    assert len(flat_p) == len(flat_a)
    for path, leaf in flat_p:
        names = flat_a[path]
        assert len(names) == leaf.ndim, (path, names, leaf.shape)
        assert all(n in LOGICAL_AXIS_RULES for n in names)


def test_tied_model_has_no_lm_head():
    cfg = ModelConfig.from_hf_config(tiny_hf_config(tie_word_embeddings=True))
    assert "lm_head" not in param_specs(cfg)
    logits = forward(init_params(cfg, jax.random.key(0)), cfg, _tokens(cfg)).logits
    assert logits.shape == (2, 12, cfg.vocab_size) and logits.dtype == jnp.float32


def test_logits_scale_inversely_with_width_multiplier(tiny_cfg):
    """logits = lm_head(norm(h) / (hidden / dim_model_base)): doubling dim_model_base doubles them."""
    params = init_params(tiny_cfg, jax.random.key(1))
    toks = _tokens(tiny_cfg)
    base = forward(params, tiny_cfg, toks).logits
    doubled = forward(params, tiny_cfg.replace(dim_model_base=2 * tiny_cfg.dim_model_base),
                      toks).logits
    np.testing.assert_allclose(doubled, 2 * base, rtol=1e-5, atol=1e-6)


def test_residual_branches_are_scaled_by_scale_depth(tiny_cfg):
    """With scale_depth -> 0 every block is the identity: logits depend on the embedding only."""
    params = init_params(tiny_cfg, jax.random.key(2))
    cfg0 = tiny_cfg.replace(scale_depth=1e-12)
    toks = _tokens(tiny_cfg)
    out = forward(params, cfg0, toks).hidden
    emb = params["embed"][toks] * tiny_cfg.scale_emb
    np.testing.assert_allclose(out, emb, rtol=1e-6, atol=1e-6)


def test_packed_documents_do_not_attend_across(tiny_cfg):
    params = init_params(tiny_cfg, jax.random.key(3))
    a, b = _tokens(tiny_cfg, 1, 7, seed=4), _tokens(tiny_cfg, 1, 5, seed=5)
    packed = jnp.concatenate([a, b], axis=1)
    seg = jnp.array([[1] * 7 + [2] * 5])
    pos = jnp.array([list(range(7)) + list(range(5))])
    out = forward(params, tiny_cfg, packed, positions=pos, segment_ids=seg).logits
    np.testing.assert_allclose(out[:, :7], forward(params, tiny_cfg, a).logits, atol=2e-5)
    np.testing.assert_allclose(out[:, 7:], forward(params, tiny_cfg, b).logits, atol=2e-5)


def test_chunked_prefill_with_padding_then_decode_matches_full_forward(tiny_cfg):
    params = init_params(tiny_cfg, jax.random.key(6))
    toks = _tokens(tiny_cfg, 2, 11, seed=7)
    full = forward(params, tiny_cfg, toks).logits
    cache = init_cache(tiny_cfg, 2, 32)
    # chunk 1: 4 tokens; chunk 2: 4 real tokens + 2 padding (position -1, not written)
    c1 = forward(params, tiny_cfg, toks[:, :4], positions=jnp.tile(jnp.arange(4), (2, 1)),
                 cache=cache)
    chunk2 = jnp.concatenate([toks[:, 4:8], jnp.zeros((2, 2), toks.dtype)], axis=1)
    pos2 = jnp.tile(jnp.array([4, 5, 6, 7, -1, -1]), (2, 1))
    c2 = forward(params, tiny_cfg, chunk2, positions=pos2, cache=c1.cache)
    np.testing.assert_allclose(c2.logits[:, :4], full[:, 4:8], atol=2e-5)
    cache = c2.cache
    for t in range(8, 11):
        step = forward(params, tiny_cfg, toks[:, t:t + 1], positions=jnp.full((2, 1), t),
                       cache=cache)
        np.testing.assert_allclose(step.logits[:, 0], full[:, t], atol=2e-5)
        cache = step.cache


def test_layers_are_scanned_so_program_size_does_not_grow_with_depth():
    def n_eqns(layers):
        cfg = ModelConfig.from_hf_config(tiny_hf_config(num_hidden_layers=layers))
        params = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
        toks = jax.ShapeDtypeStruct((1, 8), jnp.int32)
        return len(jax.make_jaxpr(lambda p, t: forward(p, cfg, t).logits)(params, toks).eqns)

    assert n_eqns(2) == n_eqns(24)


def test_bfloat16_params_keep_float32_norms_and_logits(tiny_cfg):
    params = init_params(tiny_cfg, jax.random.key(8), dtype=jnp.bfloat16)
    assert params["layers"]["wq"].dtype == jnp.bfloat16
    assert params["final_norm"].dtype == jnp.float32
    toks = _tokens(tiny_cfg)
    lo = forward(params, tiny_cfg, toks, dtype=jnp.bfloat16).logits
    hi = forward(jax.tree.map(lambda x: x.astype(jnp.float32), params), tiny_cfg, toks).logits
    assert lo.dtype == jnp.float32
    # bf16 keeps ~3 significant digits: the error must be small against the logits' spread
    assert float(jnp.max(jnp.abs(lo - hi))) < 0.05 * float(jnp.std(hi))


def test_longrope_uses_long_factors_only_beyond_original_length(tiny_cfg):
    rs = tiny_cfg.rope_scaling
    hd = tiny_cfg.head_dim
    base = 1.0 / (tiny_cfg.rope_theta ** (np.arange(0, hd, 2) / hd))
    inv, scale = rope_frequencies(tiny_cfg)  # max_pos 256 > original 128: long factors
    np.testing.assert_allclose(inv, base / np.array(rs["long_factor"]), rtol=1e-6)
    assert scale == pytest.approx(math.sqrt(1 + math.log(2) / math.log(128)))
    short_cfg = tiny_cfg.replace(max_position_embeddings=128)
    inv, scale = rope_frequencies(short_cfg)
    np.testing.assert_allclose(inv, base / np.array(rs["short_factor"]), rtol=1e-6)
    assert scale == 1.0


def test_mup_init_scales_hidden_matrices_by_inverse_sqrt_width(tiny_cfg):
    mup = init_params(tiny_cfg, jax.random.key(9), parametrization="mup")
    sp = init_params(tiny_cfg, jax.random.key(9), parametrization="standard")
    m = tiny_cfg.width_multiplier
    ratio = float(jnp.std(mup["layers"]["w_up"]) / jnp.std(sp["layers"]["w_up"]))
    assert ratio == pytest.approx(1 / math.sqrt(m), rel=1e-5)
    np.testing.assert_array_equal(mup["embed"], sp["embed"])
