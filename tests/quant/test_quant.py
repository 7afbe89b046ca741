"""Weight quantization: format bounds, packing, GPTQ beats RTN where it should, P-GPTQ's Hessian,
and the quantized forward equals the forward of the dequantized weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpmjax.config import ModelConfig
from cpmjax.model import embed_tokens, forward, init_params
from cpmjax.quant.gptq import CalibBatch, calibration_bytes
from cpmjax.quant import (accumulate_hessians, dequantize, gptq_quantize, pack_int4, qforward,
                          quantize_params, quantize_rtn, unpack_int4)
from cpmjax.quant.qforward import check_spec_quant
from tests.conftest import tiny_hf_config


@pytest.mark.parametrize("bits", [4, 8])
def test_round_trip_error_is_at_most_half_a_step(bits):
    w = np.random.default_rng(0).normal(size=(256, 48)).astype(np.float32)
    w[:128, 3] *= 50  # one group with an outlier column must not affect the other group
    qt = quantize_rtn(w, bits, 128)
    step = np.repeat(np.asarray(qt["scales"]), 128, axis=0)
    err = np.abs(np.asarray(dequantize(qt)) - w)
    assert np.all(err <= step * (0.5 + 1e-5))  # float32 rounding of w / scale only
    absmax = np.abs(w.reshape(2, 128, 48)).max(1)
    np.testing.assert_allclose(qt["scales"], 2 * absmax / (2 ** bits - 1), rtol=1e-6)
    assert err.mean() < (0.3 if bits == 4 else 0.02) * np.abs(w).mean()


def test_int4_packing_round_trip_and_layout():
    q = np.random.default_rng(1).integers(-8, 8, size=(64, 5)).astype(np.int32)
    words = pack_int4(q)
    assert words.shape == (8, 5) and words.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(unpack_int4(jnp.asarray(words))), q)
    col = np.arange(-8, 0, dtype=np.int32)[:, None]  # rows 0..7 -> nibbles 0..7, low first
    assert int(pack_int4(col).view(np.uint32)[0, 0]) == 0x76543210


def _correlated_inputs(n=4096, d=128, seed=2):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 16))
    return z @ rng.normal(size=(16, d)) + 0.05 * rng.normal(size=(n, d))  # low-rank + noise


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_reduces_layer_output_error_on_correlated_inputs(bits):
    x = _correlated_inputs()
    w = np.random.default_rng(3).normal(size=(128, 32))
    H = x.T @ x / len(x)
    out_err = lambda qt: np.linalg.norm(x @ (np.asarray(dequantize(qt), np.float64) - w))
    rtn, gptq = out_err(quantize_rtn(w, bits, 128)), out_err(gptq_quantize(w, H, bits, 128))
    assert gptq < 0.5 * rtn, (gptq, rtn)


def test_gptq_with_identity_hessian_is_rtn():
    """With H = I there is no correlation to exploit: GPTQ must reduce to round-to-nearest."""
    w = np.random.default_rng(4).normal(size=(128, 16))
    a, b = quantize_rtn(w, 4, 64), gptq_quantize(w, np.eye(128), 4, 64, damp=0.0)
    np.testing.assert_array_equal(a["qweight"], b["qweight"])


def _cfg(**kw):
    return ModelConfig.from_hf_config(tiny_hf_config(num_hidden_layers=2, **kw))


def _first_layer_inputs(rows: int):
    """(cfg, params, layer 0, tokens, positions, hidden states entering layer 0) of 12 tokens."""
    cfg = _cfg()
    params = init_params(cfg, jax.random.key(0))
    layer = jax.tree.map(lambda a: a[0], params["layers"])
    tokens = jax.random.randint(jax.random.key(1), (rows, 12), 0, cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(12), (rows, 12))
    return cfg, params, layer, tokens, pos, embed_tokens(params, cfg, tokens)


def test_pgptq_hessian_drops_the_first_four_positions():
    cfg, params, layer, tokens, pos, h = _first_layer_inputs(2)
    noise = jax.random.normal(jax.random.key(2), h[:, :4].shape) * 30
    loud = h.at[:, :4].set(h[:, :4] * 30 + noise)  # huge, differently shaped prefix activations
    hess = lambda x, skip: accumulate_hessians([CalibBatch(x, pos, None)], layer, cfg, skip)
    p_h, p_loud, g_h, g_loud = hess(h, 4), hess(loud, 4), hess(h, 0), hess(loud, 0)
    # attn_in is per token (RMSNorm), so P-GPTQ's H ignores whatever the first 4 positions hold
    np.testing.assert_allclose(p_h["attn_in"], p_loud["attn_in"], rtol=1e-5, atol=1e-7)
    assert np.abs(g_h["attn_in"] - g_loud["attn_in"]).max() > 1e-2
    # and equals the Gram matrix of positions >= 4 by hand
    from cpmjax.model.layers import rms_norm
    x = np.asarray(rms_norm(h, layer["input_norm"], cfg.rms_norm_eps))[:, 4:].reshape(-1, 64)
    np.testing.assert_allclose(p_h["attn_in"], x.T @ x / len(x), rtol=1e-4, atol=1e-6)


def test_streamed_hessians_equal_one_pass_over_all_rows():
    """Batch by batch accumulation gives the H of every row at once, with uneven batches."""
    cfg, params, layer, tokens, pos, h = _first_layer_inputs(5)
    whole = accumulate_hessians([CalibBatch(h, pos, None)], layer, cfg, 4)
    parts = accumulate_hessians([CalibBatch(h[:2], pos[:2], None),
                                 CalibBatch(h[2:], pos[2:], None)], layer, cfg, 4)
    assert set(whole) == {"attn_in", "wo_in", "mlp_in", "down_in"}
    for name in whole:
        np.testing.assert_allclose(parts[name], whole[name], rtol=1e-5, atol=1e-7)
    batches = lambda: [{"inputs": tokens[i:i + 1], "positions": pos[i:i + 1]} for i in range(5)]
    one = quantize_params(cfg, params, "pgptq", group_size=32,
                          calibration=[{"inputs": tokens, "positions": pos}])
    streamed = quantize_params(cfg, params, "pgptq", group_size=32, calibration=batches())
    for name in ("wq", "wo", "w_down"):  # scales come from the weights alone; codes from H,
        a, b = one["layers"][name], streamed["layers"][name]  # equal up to float summation order
        np.testing.assert_array_equal(a["scales"], b["scales"])
        same = np.mean(np.asarray(dequantize(a)) == np.asarray(dequantize(b)))
        assert same >= 0.995, (name, same)


def test_calibration_bytes_of_the_8b_preset_fit_one_host():
    from cpmjax import presets

    cfg = ModelConfig.from_hf_config(presets.minicpm4_8b())
    parts = calibration_bytes(cfg, rows=128, seq_len=2048, batch_rows=4)
    # Hessians: 2 x 4096^2 + 4096^2 + 16384^2 float64 values; hidden states 128 x 2048 x 4096 f32
    assert parts["hessians"] == 8 * (3 * 4096 ** 2 + 16384 ** 2)
    assert parts["hidden_states"] == 4 * 128 * 2048 * 4096
    assert sum(parts.values()) < 16 * 2 ** 30


@pytest.mark.parametrize("method", ["rtn", "gptq", "pgptq"])
def test_qforward_equals_forward_of_dequantized_weights(method):
    cfg = _cfg()
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    calib = None if method == "rtn" else [{"inputs": tokens,
                                           "positions": jnp.broadcast_to(jnp.arange(16), (2, 16))}]
    q = quantize_params(cfg, params, method, bits=4, group_size=32, calibration=calib)
    assert q["layers"]["wq"]["qweight"].dtype == jnp.int32  # packed, not dense
    dense = {**params, "layers": {k: (dequantize(v).reshape(params["layers"][k].shape)
                                      if isinstance(v, dict) else v)
                                  for k, v in q["layers"].items()}}
    np.testing.assert_allclose(qforward(q, cfg, tokens).logits, forward(dense, cfg, tokens).logits,
                               rtol=1e-5, atol=1e-5)
    ref = forward(params, cfg, tokens).logits
    assert 0 < float(jnp.abs(qforward(q, cfg, tokens).logits - ref).max())


def test_bad_quant_arguments_are_named():
    w = np.zeros((96, 4), np.float32)
    with pytest.raises(ValueError, match="bits"):
        quantize_rtn(w, 3, 32)
    with pytest.raises(ValueError, match="group_size 128"):
        quantize_rtn(w, 4, 128)
    with pytest.raises(ValueError, match="calibration"):
        quantize_params(_cfg(), init_params(_cfg(), jax.random.key(0)), "gptq", group_size=32)
    with pytest.warns(UserWarning, match="full-precision target"):
        check_spec_quant(target_quantized=False, draft_quantized=True)
