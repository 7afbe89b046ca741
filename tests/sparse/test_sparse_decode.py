"""InfLLM v2 decode through a KV cache: the cached path gathers only the selected blocks.

Rows at different lengths in one batch, token-by-token and k+1-token (speculative verification)
steps, against the full-sequence forward and the masked (dense-cost) oracle; and a compiled-HLO
check that no value as wide as the cache is computed.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpmjax.model import forward, init_cache, init_params
from cpmjax.model.attention import attend
from cpmjax.sparse.cache import init_compressed, update_compressed
from tests.sparse.test_sparse_model import T, logits_fn, make_cfg

LENS = (40, 57)  # prompt lengths of the two rows


@pytest.fixture(scope="module")
def model():
    cfg = make_cfg()
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, T), 0, cfg.vocab_size)
    return cfg, params, tokens, logits_fn(cfg)(params, tokens)


@pytest.mark.parametrize("step_len", [1, 4])
def test_ragged_decode_equals_full_sequence(model, step_len):
    """Prefill rows of 40 and 57 tokens (the short one padded with position -1), then feed
    ``step_len`` tokens per row per call at each row's own positions: every logit equals the
    full-sequence forward (fast op) at that position."""
    cfg, params, tokens, full = model
    step = jax.jit(lambda p, t, pos, c: forward(p, cfg, t, positions=pos, cache=c))
    lens = jnp.asarray(LENS)
    width = max(LENS)
    pos = jnp.where(jnp.arange(width) < lens[:, None], jnp.arange(width), -1)
    out = step(params, tokens[:, :width], pos, init_cache(cfg, 2, T))
    for r, n in enumerate(LENS):
        np.testing.assert_allclose(out.logits[r, :n], full[r, :n], atol=2e-5)
    cache, rows = out.cache, jnp.arange(2)[:, None]
    for i in range(0, T - width - step_len + 1, step_len):
        pos = lens[:, None] + i + jnp.arange(step_len)
        out = step(params, tokens[rows, pos], pos, cache)
        cache = out.cache
        np.testing.assert_allclose(out.logits, full[rows, pos], atol=2e-5, err_msg=f"step {i}")


def _layer_inputs(cfg, s: int, q_pos: jax.Array, seed: int = 0):
    """Random q and a full random cache (junk after each row's position), its kernels."""
    b, tq = q_pos.shape
    h, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(ks[0], (b, tq, h, d))
    k, v = (jax.random.normal(x, (b, s, kvh, d)) for x in ks[1:])
    comp = update_compressed(init_compressed(cfg.sparse_config, b, s, kvh, d), k,
                             jnp.broadcast_to(jnp.arange(s), (b, s)), cfg.sparse_config)
    return q, k, v, comp


def _attend(cfg, compressed, q, k, v, q_pos, masked: bool = False):
    """One layer's attention into the cache; ``masked`` marks every token as one document, which
    takes the packed-row (masked, dense-cost) path: the oracle."""
    kv_pos = jnp.broadcast_to(jnp.arange(k.shape[1]), k.shape[:2])
    seg = (lambda x: jnp.zeros(x.shape[:2], jnp.int32)) if masked else (lambda x: None)
    return attend(q, k, v, q_pos=q_pos, kv_pos=kv_pos, q_seg=seg(q), kv_seg=seg(k), cfg=cfg,
                  compressed=compressed)


@pytest.mark.parametrize("heads,kv", [(4, 2), (8, 1)])
def test_cached_path_equals_masked_oracle(heads, kv):
    """k+1 = 4 queries per row at different cache positions: the cached gather path equals the
    masked path (selection on positions + dense attention under the block mask)."""
    cfg = make_cfg(heads=heads, kv=kv)
    q_pos = jnp.asarray([[20, 21, 22, 23], [131, 132, 133, 134], [290, 291, 292, 293]])
    q, k, v, comp = _layer_inputs(cfg, 300, q_pos)
    got = jax.jit(lambda *a: _attend(cfg, comp, *a))(q, k, v, q_pos)
    want = jax.jit(lambda *a: _attend(cfg, None, *a, masked=True))(q, k, v, q_pos)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # a cache without kept kernels (the MTP draft layer's) pools them: same result
    pooled = jax.jit(lambda *a: _attend(cfg, None, *a))(q, k, v, q_pos)
    np.testing.assert_allclose(pooled, got, atol=1e-6, rtol=1e-6)
    dense = jax.jit(lambda *a: _attend(make_cfg(heads=heads, kv=kv, off=True), None, *a))(
        q, k, v, q_pos)
    assert float(jnp.abs(got[2] - dense[2]).max()) > 1e-3  # 19 blocks, 4 read: really sparse


_INSTR = re.compile(r"= \w+\[([\d,]*)\]\S* (\S+?)\(")


def _cache_wide(hlo: str, s: int) -> list[str]:
    """Instructions, other than parameters, with a dimension of size s (fused ones included)."""
    return [line.strip() for line in hlo.splitlines()
            if (m := _INSTR.search(line)) and str(s) in m.group(1).split(",")
            and m.group(2) != "parameter"]


def _materialized_at_least(hlo: str, size: int) -> list[str]:
    """Non-parameter values of at least ``size`` elements that XLA writes to memory, i.e. those
    outside fusion bodies (a relayout fused into a gather reads only the gathered elements)."""
    fused = set(re.findall(r"calls=(%[\w.\-]+)", hlo))
    out, skip = [], False
    for line in hlo.splitlines():
        if line and not line[0].isspace():  # a computation header (or its closing brace)
            skip = line.split(" ")[0] in fused
        elif not skip and (m := _INSTR.search(line)) and m.group(2) != "parameter":
            if m.group(1) and np.prod([int(x) for x in m.group(1).split(",")]) >= size:
                out.append(line.strip())
    return out


@pytest.mark.parametrize("tq", [1, 4])
def test_cached_attention_computes_nothing_cache_wide(tq):
    """The compiled decode attention of one layer (selection + stage 2) has no score or mask as
    wide as the cache and writes no copy of it; the masked path it replaced has both (so the
    check can fail)."""
    cfg = make_cfg()
    s = 2004  # not a multiple of the block size: the block layout pads, inside the gather
    q_pos = jnp.asarray([[5 + t for t in range(tq)], [1500 + t for t in range(tq)]])
    q, k, v, comp = _layer_inputs(cfg, s, q_pos)
    cache_size = k.size

    def hlo(masked: bool):
        fn = jax.jit(lambda *a: _attend(cfg, comp, *a, masked=masked))
        return fn.lower(q, k, v, q_pos).compile().as_text()

    cached, masked = hlo(False), hlo(True)
    assert _cache_wide(cached, s) == []
    assert _materialized_at_least(cached, cache_size) == []
    assert len(_cache_wide(masked, s)) > 0
    assert len(_materialized_at_least(masked, cache_size)) > 0


def test_model_decode_step_takes_the_cached_path(model):
    """The model's cached step calls the per-row ops; a packed-row forward does not."""
    cfg, params, tokens, _ = model
    cache = init_cache(cfg, 2, T)
    step = jax.make_jaxpr(lambda t, pos: forward(params, cfg, t, positions=pos, cache=cache).logits)
    text = str(step(tokens[:, :1], jnp.full((2, 1), 7)))
    assert "select_blocks_at" in text and "sparse_attention_at" in text
    packed = jax.make_jaxpr(lambda t: forward(params, cfg, t,
                                              segment_ids=jnp.zeros_like(t)).logits)(tokens)
    assert "sparse_attention_at" not in str(packed)
