"""Stage-2 forward of InfLLM v2 as a backend-neutral Pallas kernel for GPU.

One program per (batch, KV head, query token); it holds the token's G query heads [G, D] and
loops over its `topk` selected blocks with an online softmax, slicing each block out of the
KV head's K/V with `pl.ds` (no scalar-prefetch grid: that is TPU-only).

Why not Mosaic GPU: its matmuls work on warpgroup tiles (>= 64 rows) fed by TMA copies of
static tiles; the per-token gather of G (often < 64) query rows against data-dependent blocks
does not map onto it without a query-tiling redesign. This body therefore uses only generic
Pallas ops, which lower through the default Pallas GPU (Triton) path today; that backend is
deprecated from JAX 0.11, so this kernel is opt-in (`implementation="pallas_gpu"`) and the
dispatcher uses the XLA gather path on GPU. Tested here only in interpret mode on CPU; on a GPU
G and D must be powers of two and G >= 16 for Triton's dot.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

_MASKED = -1e30


def _fwd_kernel(idx_ref, q_ref, k_ref, v_ref, o_ref, *lse_ref, scale: float, block_size: int,
                cache_len: int, topk: int) -> None:
    t = pl.program_id(2)
    q = q_ref[...]  # [G, D]
    g, d = q.shape

    def body(s, carry):
        m, l, acc = carry
        blk = idx_ref[s]
        start = jnp.maximum(blk, 0) * block_size
        k = k_ref[pl.ds(start, block_size), :]
        v = v_ref[pl.ds(start, block_size), :]
        sc = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32) * scale
        key_pos = start + jax.lax.broadcasted_iota(jnp.int32, sc.shape, 1)
        mask = (key_pos <= cache_len + t) & (blk >= 0)
        sc = jnp.where(mask, sc, _MASKED)
        m_new = jnp.maximum(m, sc.max(axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(sc - m_new), 0.0)
        alpha = jnp.exp(m - m_new)
        pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        return m_new, alpha * l + p.sum(axis=1, keepdims=True), alpha * acc + pv

    init = (jnp.full((g, 1), _MASKED, jnp.float32), jnp.zeros((g, 1), jnp.float32),
            jnp.zeros((g, d), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, topk, body, init)
    o_ref[...] = jnp.where(l > 0, acc / jnp.where(l > 0, l, 1.0), 0.0).astype(o_ref.dtype)
    for ref in lse_ref:  # only with return_lse; rows with no visible key get 0
        ref[...] = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), 0.0)


def sparse_attention_fwd(q: jax.Array, k: jax.Array, v: jax.Array, block_idx: jax.Array, *,
                         block_size: int, cache_len: int = 0, softmax_scale: float | None = None,
                         interpret: bool = False, return_lse: bool = False):
    """Forward; same contract as `pallas_tpu.sparse_attention_fwd` (LSE [B, KV, Tq, G, 1])."""
    b, tq, h, d = q.shape
    tk, kvh = k.shape[1], k.shape[2]
    g, topk = h // kvh, block_idx.shape[-1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    tk_pad = -(-tk // block_size) * block_size

    def per_head(x: jax.Array) -> jax.Array:  # [B, KV, Tk_pad, D]
        return jnp.pad(x, ((0, 0), (0, tk_pad - tk), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    qg = q.reshape(b, tq, kvh, g, d).transpose(0, 2, 1, 3, 4)  # [B, KV, Tq, G, D]
    qo_spec = pl.BlockSpec((None, None, None, g, d), lambda bi, hi, ti: (bi, hi, ti, 0, 0))
    kv_spec = pl.BlockSpec((None, None, tk_pad, d), lambda bi, hi, ti: (bi, hi, 0, 0))
    lse_spec = pl.BlockSpec((None, None, None, g, 1), lambda bi, hi, ti: (bi, hi, ti, 0, 0))
    idx_spec = pl.BlockSpec((None, None, None, topk), lambda bi, hi, ti: (bi, hi, ti, 0))
    kernel = functools.partial(_fwd_kernel, scale=scale, block_size=block_size,
                               cache_len=cache_len, topk=topk)
    o_shape = jax.ShapeDtypeStruct(qg.shape, q.dtype)
    lse_shape = jax.ShapeDtypeStruct((*qg.shape[:-1], 1), jnp.float32)
    res = pl.pallas_call(
        kernel,
        grid=(b, kvh, tq),
        in_specs=[idx_spec, qo_spec, kv_spec, kv_spec],
        out_specs=[qo_spec, lse_spec] if return_lse else qo_spec,
        out_shape=[o_shape, lse_shape] if return_lse else o_shape,
        interpret=interpret,
    )(block_idx.astype(jnp.int32), qg, per_head(k), per_head(v))
    out = (res[0] if return_lse else res).transpose(0, 2, 1, 3, 4).reshape(b, tq, h, d)
    return (out, res[1]) if return_lse else out
