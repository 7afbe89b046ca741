"""Matmuls on packed weights: ``linear`` on a QuantizedWeight equals dequantize-then-matmul for
int4, int8 and ternary (both ternary paths, per-tensor/per-channel/grouped scales, ``wo``'s two
input dims), the wrapper behaves as the model's weights do, and quantized forward passes
(prefill and cached decode) give the logits of the dequantized model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpmjax.config import ModelConfig
from cpmjax.model import forward, init_cache, init_params
from cpmjax.model.layers import linear
from cpmjax.quant import dequantize, qforward, quantize_params, quantize_rtn, ternary
from cpmjax.quant.qforward import dequantize_layer
from cpmjax.quant.qlinear import SUBROW_MAX_M, QuantizedWeight, quantized_weight
from tests.conftest import tiny_hf_config


def _packed(fmt: str, w: np.ndarray, group: int) -> dict[str, jax.Array]:
    if fmt == "ternary":
        s = ternary.absmean_scales(jnp.asarray(w), group, 1e-5)
        codes = np.asarray(ternary.ternary_codes(jnp.asarray(w), s))
        return {"qweight": jnp.asarray(ternary.pack_codes(codes)), "scales": s}
    return {k: jnp.asarray(v) for k, v in quantize_rtn(w, 4 if fmt == "int4" else 8, group).items()}


CASES = [  # (format, logical shape, n_in, rows M, group)
    ("int4", (64, 48), 1, 1, 16), ("int4", (4, 16, 32), 2, 3, 32), ("int4", (128, 8), 1, 40, 128),
    ("int8", (64, 48), 1, 1, 16), ("int8", (4, 16, 32), 2, 5, 64), ("int8", (32, 24), 1, 33, 8),
    ("ternary", (64, 48), 1, 1, 16), ("ternary", (4, 16, 32), 2, 3, 16),
    ("ternary", (64, 48), 1, SUBROW_MAX_M + 1, 16),  # above the sub-row threshold: dequantized
    ("ternary", (32, 16), 1, 2, -1), ("ternary", (32, 16), 1, 2, 0),  # per channel, per tensor
    ("ternary", (32, 16), 1, 2, 2),  # groups narrower than a byte's four rows: dequantized
]


@pytest.mark.parametrize("fmt,shape,n_in,m,group", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_packed_matmul_equals_dequantize_then_matmul(fmt, shape, n_in, m, group, dtype):
    rng = np.random.default_rng(0)
    k, n = int(np.prod(shape[:n_in])), int(np.prod(shape[n_in:]))
    packed = _packed(fmt, rng.normal(size=(k, n)).astype(np.float32), group)
    x = jnp.asarray(rng.normal(size=(m, *shape[:n_in])), dtype)
    qw = quantized_weight(packed, shape).astype(dtype)
    got = jax.jit(lambda x, w: linear(x, w, n_in))(x, qw)
    want = linear(x, dequantize(packed).reshape(shape).astype(dtype), n_in)
    assert got.shape == (m, *shape[n_in:]) and got.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 2e-2  # bf16: one rounding of a sum of k products
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=tol, atol=tol * float(jnp.abs(want.astype(jnp.float32)).max()))
    f32 = linear(x, qw, n_in, preferred_element_type=jnp.float32)
    assert f32.dtype == jnp.float32


def test_quantized_weight_acts_like_a_weight_under_jit_and_tree_maps():
    packed = _packed("int4", np.ones((32, 8), np.float32), 16)
    qw = quantized_weight(packed, (2, 16, 8))
    assert qw.shape == (2, 16, 8) and qw.format == "int4" and qw.dtype == jnp.float32
    bf = qw.astype(jnp.bfloat16)
    assert isinstance(bf, QuantizedWeight) and bf.dtype == jnp.bfloat16
    assert bf.qweight is qw.qweight  # the packed codes are not converted
    leaves, tree = jax.tree.flatten(bf)
    assert len(leaves) == 2 and jax.tree.unflatten(tree, leaves) == bf
    np.testing.assert_array_equal(bf.dense(jnp.float32), dequantize(packed).reshape(2, 16, 8))
    layer = dequantize_layer(ModelConfig.from_hf_config(tiny_hf_config()))(
        {"wo": packed, "input_norm": jnp.ones(4)})
    assert isinstance(layer["wo"], QuantizedWeight) and layer["input_norm"].shape == (4,)


def _dense(cfg: ModelConfig, qparams: dict) -> dict:
    shapes = {k: v.shape for k, v in init_params(cfg, jax.random.key(0))["layers"].items()}
    return {**qparams, "layers": {k: (dequantize(v).reshape(shapes[k]) if isinstance(v, dict)
                                      else v) for k, v in qparams["layers"].items()}}


@pytest.mark.parametrize("fmt", ["int8", "ternary"])
def test_quantized_prefill_and_decode_give_the_dequantized_models_logits(fmt):
    cfg = ModelConfig.from_hf_config(tiny_hf_config())
    params = init_params(cfg, jax.random.key(0))
    q = (ternary.pack_params(params, ternary.TernaryConfig(group_size=16)) if fmt == "ternary"
         else quantize_params(cfg, params, "rtn", bits=8, group_size=32))
    dense = _dense(cfg, q)
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)  # M = 18 rows
    np.testing.assert_allclose(qforward(q, cfg, tokens).logits, forward(dense, cfg, tokens).logits,
                               rtol=1e-5, atol=1e-5)
    step = jax.jit(lambda p, t, pos, c, f: f(p, cfg, t, positions=pos, cache=c),
                   static_argnums=4)
    cache_q = cache_d = init_cache(cfg, 2, 16, jnp.float32)
    for i in range(3):  # one-token steps: M = 2 rows (ternary's per-2-bit-position dots)
        t, pos = tokens[:, i:i + 1], jnp.full((2, 1), i, jnp.int32)
        out_q, out_d = step(q, t, pos, cache_q, qforward), step(dense, t, pos, cache_d, forward)
        np.testing.assert_allclose(out_q.logits, out_d.logits, rtol=1e-5, atol=1e-5)
        cache_q, cache_d = out_q.cache, out_d.cache


def test_ternary_takes_one_dot_per_2_bit_position_only_for_few_rows():
    qw = quantized_weight(_packed("ternary", np.ones((64, 8), np.float32), 16), (64, 8))
    dots = lambda m: str(jax.make_jaxpr(qw.matmul)(jnp.ones((m, 64)))).count("dot_general")
    assert dots(SUBROW_MAX_M) == 4 and dots(SUBROW_MAX_M + 1) == 1
